"""The ``paper`` preset on its real loading path: a local Stable Diffusion folder.

No SD weights exist on our machines, so a randomly initialised stand-in folder
of SD 1.x's shape family is written in diffusers' layout (``model_index.json``,
``vae/``, ``unet/``): a 4-level AutoencoderKL (downsampling 8, 4 latent
channels, scaling factor 0.18215) and a UNet2DConditionModel with SD 1.x's
block types and ``cross_attention_dim=768``, both with tiny widths. Everything
else is the paper preset as written: the 12-layer, 768-wide BERT conditioner
over k = 3 tokens, 256 x 256 images (32 x 32 latents), rank-16 LoRA, the
768-wide aligner, the paper's TrainConfig sections (one step each via
``until``). Barcodes are 240 nt (80 tokens) rather than 658 to keep the BERT
step cheap; tests/test_conditioner.py runs the paper conditioner at full length.

The save/load round trip matters most: users load SD, finetune and save, and
a reload must rebuild the folder's UNet, not the one the preset's fields
would describe.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from g2p.config import ConfigError, G2PConfig, preset
from g2p.data.dataset import Arrays
from g2p.pipeline import G2PDiffusionPipeline
from g2p.model import G2PDiffusion
from g2p.models.vae import load_vae
from g2p.train import stages
from g2p.train.checkpoint import ArchitectureMismatch
from g2p.train.loop import Hooks

WIDTHS = (8, 8, 16, 16)  # SD 1.x: (128, 256, 512, 512) VAE, (320, 640, 1280, 1280) UNet
BARCODE_NT = 240


def write_standin_sd(root: Path, *, cross_attention_dim: int = 768, vae_levels: int = 4, seed: int = 0) -> Path:
    """A random Stable Diffusion 1.x-shaped folder (diffusers layout) with tiny widths."""
    torch.manual_seed(seed)
    widths = WIDTHS[:vae_levels]
    AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels, up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=widths, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=256, scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(  # SD 1.x's block layout: cross-attention in the three upper levels
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=WIDTHS, layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=2, norm_num_groups=4,
    ).save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
    }, indent=2) + "\n")
    return root


def paper_config(folder: Path) -> G2PConfig:
    """The paper preset, unchanged but for where Stable Diffusion lives."""
    return preset("paper").override({"vae": {"pretrained_path": str(folder)},
                                     "unet": {"pretrained_path": str(folder)}})


def arrays(n: int, size: int, seed: int = 0) -> Arrays:
    """Random barcodes, places and images: shapes are what is tested here, not learning."""
    rng = np.random.default_rng(seed)
    return Arrays(
        processid=np.array([f"P{i}" for i in range(n)]),
        barcode=["".join(rng.choice(list("ACGT"), BARCODE_NT)) for _ in range(n)],
        lat=torch.linspace(-40, 40, n), lon=torch.linspace(-60, 60, n), has_place=torch.ones(n, dtype=torch.bool),
        species=np.array([f"sp{i}" for i in range(n)], dtype=object),
        images=torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The paper model loaded from the stand-in, one LoRA + conditioner step and one aligner step."""
    root = tmp_path_factory.mktemp("paper")
    cfg = paper_config(write_standin_sd(root / "stable-diffusion"))
    torch.manual_seed(0)
    model = G2PDiffusion(cfg)
    data = arrays(2, cfg.vae.image_size)
    latents = stages.encode_latents(model, data.images)
    metrics: dict[str, dict] = {}

    def keep(name: str) -> Hooks:
        return Hooks(on_step=[lambda step, m: metrics.__setitem__(name, m)])

    for name, run, tc in (
        ("diffusion", lambda tc, h: stages.train_diffusion(model, data, tc, latents=latents, hooks=h, progress=False,
                                                           until=1), cfg.train_diffusion),
        ("aligner", lambda tc, h: stages.train_aligner(model, data, tc, latents=latents, hooks=h, progress=False,
                                                       until=1), cfg.train_aligner),
    ):
        state = run(replace(tc, log_every=1), keep(name))
        assert state.step == 1
    yield model, data, latents, metrics, root
    shutil.rmtree(root, ignore_errors=True)  # a paper-size checkpoint is ~0.5 GB


def test_paper_preset_loads_the_folder_and_records_its_architecture(trained) -> None:
    model, _, latents, _, _ = trained
    paper = preset("paper")
    assert model.cfg.conditioner == paper.conditioner and model.cfg.tokenizer == paper.tokenizer
    assert model.conditioner.bert.config.num_hidden_layers == 12 and model.conditioner.hidden_size == 768
    assert latents.shape == (2, 4, 32, 32) and model.latent_shape == (4, 32, 32)  # 256 px / 8
    assert tuple(model.denoiser.unet.config.block_out_channels) == WIDTHS
    # the model's config describes the loaded weights, not the preset's SD 1.x widths
    assert model.cfg.unet.block_out_channels == WIDTHS and model.cfg.vae.block_out_channels == WIDTHS
    assert model.cfg.unet.cross_attention_levels == (True, True, True, False)
    assert model.cfg.unet.norm_num_groups == 4 and model.cfg.vae.scaling_factor == 0.18215


def test_one_lora_step_and_one_aligner_step(trained) -> None:
    model, _, _, metrics, _ = trained
    assert model.has_lora
    for name in ("diffusion", "aligner"):
        m = metrics[name]
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0, (name, m)
    lora_b = [p for n, p in model.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.ne(0).any()) for p in lora_b)  # B starts at 0; one step moved it
    assert model.negative_bank.shape == (2, 768)


def test_one_guided_sampling_step(trained) -> None:
    model, data, _, _, _ = trained
    images = G2PDiffusionPipeline.from_model(model)(
        data.barcode[:1], [45.0], [-75.0], num_inference_steps=1, guidance_scale=3.0, aligner_guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_save_load_round_trip_rebuilds_the_folder_unet(trained) -> None:
    model, data, _, _, root = trained
    path = model.save_pretrained(root / "ckpt")
    # the loaded folder may vanish (or move) after training: the checkpoint suffices
    shutil.rmtree(root / "stable-diffusion")
    loaded = G2PDiffusion.from_pretrained(path, cfg=model.cfg)
    assert loaded.has_lora and tuple(loaded.denoiser.unet.config.block_out_channels) == WIDTHS
    assert loaded.cfg == model.cfg
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    args = (data.barcode[:1], [45.0], [-75.0])
    kw = dict(num_inference_steps=1, guidance_scale=3.0, aligner_guidance_scale=1.0, output_type="pt")
    a = G2PDiffusionPipeline.from_model(model)(*args, generator=torch.Generator().manual_seed(3), **kw).images
    b = G2PDiffusionPipeline.from_model(loaded)(*args, generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(a, b)
    # a config that describes another UNet is refused, naming the field
    with pytest.raises(ArchitectureMismatch, match=r"unet\.block_out_channels"):
        G2PDiffusion.from_pretrained(path, cfg=model.cfg.set("unet.block_out_channels", [320, 640, 1280, 1280]))
    shutil.rmtree(path)


def test_folder_that_does_not_fit_names_the_field(tmp_path: Path) -> None:
    wide = write_standin_sd(tmp_path / "sd-1024", cross_attention_dim=1024)
    with pytest.raises(ConfigError, match=r"conditioner\.hidden_size.*1024.*768"):
        G2PDiffusion(paper_config(wide))
    shallow = write_standin_sd(tmp_path / "sd-3-levels", vae_levels=3)
    with pytest.raises(ConfigError, match=r"vae\.block_out_channels"):
        load_vae(paper_config(shallow).vae)
    with pytest.raises(ConfigError, match=r"vae\.scaling_factor"):
        load_vae(paper_config(wide).set("vae.scaling_factor", 1.0).vae)
    with pytest.raises(ConfigError, match=r"vae\.pretrained_path"):
        G2PDiffusion(paper_config(tmp_path / "nowhere"))
