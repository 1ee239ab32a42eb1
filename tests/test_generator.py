"""The whole model on tiny sizes: train every stage, save, load, convert to the pipeline, generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from g2p.config import preset
from g2p.model import G2PDiffusion
from g2p.pipeline import G2PDiffusionPipeline, load_pipeline
from g2p.train import stages
from g2p.train.checkpoint import ArchitectureMismatch
from g2p.train.loop import Hooks
from tests.fixtures import two_species_arrays

CFG = preset("tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[float]]]:
    torch.manual_seed(0)
    data = two_species_arrays()
    model = G2PDiffusion(CFG)
    losses: dict[str, list[float]] = {}

    def track(name: str) -> Hooks:
        return Hooks(on_step=[lambda step, m: losses.setdefault(name, []).append(m["loss"])])

    stages.pretrain_conditioner(model, data, CFG.pretrain_conditioner, hooks=track("mlm"), progress=False)
    stages.train_vae(model, data, CFG.train_vae, hooks=track("vae"), progress=False)
    latents = stages.encode_latents(model, data.images)
    stages.train_base(model, data, CFG.train_base, latents=latents, hooks=track("base"), progress=False)
    model.add_lora()
    losses["eval_before"] = [stages.eval_diffusion_loss(model, data, latents)]
    stages.train_diffusion(model, data, CFG.train_diffusion, latents=latents, hooks=track("diffusion"), progress=False)
    losses["eval_after"] = [stages.eval_diffusion_loss(model, data, latents)]
    stages.train_aligner(model, data, CFG.train_aligner, latents=latents, hooks=track("aligner"), progress=False)
    out = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "g2pdiffusion")
    return out, losses


def test_every_stage_trains_and_diffusion_loss_goes_down(trained) -> None:
    _, losses = trained
    assert {"mlm", "vae", "base", "diffusion", "aligner"} <= set(losses)
    # the conditional (LoRA + conditioner) stage lowers eq. 6 on fixed noise and timesteps
    assert losses["eval_after"][0] < losses["eval_before"][0], losses
    assert losses["vae"][-1] < losses["vae"][0]
    assert all(np.isfinite(v) for vs in losses.values() for v in vs)


def test_checkpoint_is_self_describing_and_round_trips(trained) -> None:
    path, _ = trained
    assert (path / "lora" / "pytorch_lora_weights.safetensors").exists()
    a = G2PDiffusion.from_pretrained(path)
    b = G2PDiffusion.from_pretrained(path, cfg=CFG)  # architecture check passes
    assert a.has_lora and a.negative_bank.shape == (CFG.sampling.negative_bank_size, CFG.conditioner.hidden_size)
    assert a.cfg.vae.scaling_factor != 1.0  # the measured latent scale travels with the checkpoint
    for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_loading_into_another_architecture_names_the_field(trained) -> None:
    path, _ = trained
    other = CFG.set("unet.block_out_channels", [16, 48])
    with pytest.raises(ArchitectureMismatch, match=r"unet\.block_out_channels"):
        G2PDiffusion.from_pretrained(path, cfg=other)
    with pytest.raises(ArchitectureMismatch, match=r"tokenizer\.k"):
        G2PDiffusion.from_pretrained(path, cfg=CFG.set("tokenizer.k", 5))


def _images(pipe, barcodes, lats, lons, seed: int, w: float, n: int = 3):
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(barcodes) * n)]
    return pipe(barcodes, lats, lons, num_images_per_barcode=n, num_inference_steps=4, aligner_guidance_scale=w,
                generator=g, output_type="pt").images


def test_same_seed_same_images_and_w0_is_unguided(trained) -> None:
    pipe = load_pipeline(str(trained[0]))
    data = two_species_arrays(4, seed=1)
    args = (data.barcode[:2], [10.0, None], [20.0, None])
    a = _images(pipe, *args, seed=7, w=2.0)
    assert a.shape == (6, 3, 32, 32)
    assert torch.equal(a, _images(pipe, *args, seed=7, w=2.0))
    assert not torch.equal(a, _images(pipe, *args, seed=8, w=2.0))
    # the trained aligner's guidance changes the images; w = 0 is exactly the unguided sampler
    unguided = _images(pipe, *args, seed=7, w=0.0)
    assert not torch.equal(a, unguided)
    pipe.aligner.requires_grad_(False)
    assert torch.equal(unguided, _images(pipe, *args, seed=7, w=0.0))


def test_convert_checkpoint_writes_the_pipeline_layout_with_the_same_images(trained, tmp_path: Path) -> None:
    from pipelines.cli import main

    new = tmp_path / "converted"
    assert main(["convert-checkpoint", str(trained[0]), str(new)]) == 0
    assert (new / "model_index.json").exists() and (new / "conditioner" / "config.json").exists()
    converted = G2PDiffusionPipeline.from_pretrained(str(new))
    in_memory = load_pipeline(str(trained[0]))  # the old layout loads too, converted on the fly
    bc = two_species_arrays(1).barcode[:1]
    assert torch.equal(_images(converted, bc, [5.0], [6.0], seed=1, w=1.0),
                       _images(in_memory, bc, [5.0], [6.0], seed=1, w=1.0))
    assert converted.cfg.sampling == in_memory.cfg.sampling
    assert torch.equal(converted.aligner.negative_bank, G2PDiffusion.from_pretrained(trained[0]).negative_bank)


def test_legacy_sampling_names_are_read_from_old_checkpoints(tmp_path: Path) -> None:
    """Before the pipeline, sampling.guidance_scale was the aligner's w and cfg_scale the CFG scale."""
    import json

    from safetensors.torch import load_file, save_file

    from g2p.train.checkpoint import CONFIG_KEY, config_from_checkpoint, read_metadata

    model = G2PDiffusion(CFG)
    path = model.save_pretrained(tmp_path / "m") / "denoiser.safetensors"
    meta = read_metadata(path)
    cfg = json.loads(meta[CONFIG_KEY])
    cfg["sampling"] = {"scheduler": "ddim", "steps": 9, "guidance_scale": 4.0, "cfg_scale": 2.5,
                       "negative_bank_size": 8}
    save_file(load_file(path), str(path), metadata={**meta, CONFIG_KEY: json.dumps(cfg)})
    s = config_from_checkpoint(path).sampling
    assert (s.steps, s.aligner_guidance_scale, s.guidance_scale) == (9, 4.0, 2.5)


def test_cli_generate_writes_a_grid(trained, tmp_path: Path) -> None:
    from PIL import Image

    from pipelines.cli import main

    out = tmp_path / "grid.png"
    rc = main(["generate", "--checkpoint", str(trained[0]), "--barcode", two_species_arrays(1).barcode[0],
               "--lat", "10", "--lon", "20", "--n", "4", "--steps", "2", "--seed", "3", "--scheduler", "unipc",
               "--guidance-scale", "2", "--aligner-guidance-scale", "1", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (2 + 2 * 34, 2 + 2 * 34)


def test_finetune_base_changes_and_saves_the_base_weights(tmp_path) -> None:
    cfg = CFG.set("lora.finetune_base", True).set("train_diffusion.steps", 3)
    data = two_species_arrays()
    model = G2PDiffusion(cfg)
    latents = stages.encode_latents(model, data.images)
    before = model.denoiser.unet.conv_in.weight.detach().clone()
    stages.train_diffusion(model, data, cfg.train_diffusion, latents=latents, progress=False)
    assert not torch.equal(model.denoiser.unet.conv_in.weight, before)  # the base trained, not only LoRA
    loaded = G2PDiffusion.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.cfg.lora.finetune_base
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train_conditioner", [True, False])
def test_train_conditioner_decides_whether_the_conditioner_moves(train_conditioner: bool) -> None:
    cfg = CFG.set("lora.train_conditioner", train_conditioner).set("train_diffusion.steps", 3)
    data = two_species_arrays()
    model = G2PDiffusion(cfg)
    latents = stages.encode_latents(model, data.images)
    cond = {k: v.clone() for k, v in model.conditioner.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.conditioner.named_parameters()}
    unet = {k: v.clone() for k, v in model.denoiser.state_dict().items() if "lora_" in k or "null_context" in k}
    stages.train_diffusion(model, data, cfg.train_diffusion, latents=latents, progress=False)
    after = model.conditioner.state_dict()
    assert all(torch.equal(cond[k], after[k]) for k in cond) is (not train_conditioner)
    assert any(not torch.equal(v, model.denoiser.state_dict()[k]) for k, v in unet.items())  # the UNet side trained
    assert {n: p.requires_grad for n, p in model.conditioner.named_parameters()} == flags  # left as found
