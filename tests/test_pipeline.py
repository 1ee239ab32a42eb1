"""G2PDiffusionPipeline on seeded tiny components (diffusers' test style): golden slice, schedulers, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from g2p.config import SCHEDULER_NAMES, preset
from g2p.model import G2PDiffusion
from g2p.pipeline import G2PDiffusionPipeline, alpha_bar_at, images_uint8, load_pipeline

CFG = preset("tiny")
A, B, C = "ACGT" * 100, "ACGGT" * 90, "TTAGC" * 100


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def pipe() -> G2PDiffusionPipeline:
    """Random-init tiny components under a fixed seed, LoRA fused, a negative bank of 4."""
    torch.manual_seed(0)
    model = G2PDiffusion(CFG)
    model.add_lora()
    model.negative_bank = torch.randn(4, CFG.conditioner.hidden_size, generator=torch.Generator().manual_seed(1))
    return G2PDiffusionPipeline.from_model(model)


def test_golden_slice(pipe) -> None:
    """A fixed seed through the whole pipeline pins these pixels (CPU, this torch)."""
    out = pipe(A, 45.0, -75.0, num_inference_steps=3, guidance_scale=2.0, aligner_guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.float32
    got = (out[0, 16, 12:16, :] * 255).round().astype(int).flatten()
    # +-1 grey level: float summation order may differ with the thread count
    assert np.abs(got - np.array(GOLDEN)).max() <= 1, str(got.tolist())


GOLDEN = [103, 17, 144, 75, 55, 173, 111, 96, 138, 70, 78, 155]  # leading spacing (2026-12-04)


def test_output_types_agree(pipe) -> None:
    kw = dict(num_inference_steps=2, num_images_per_barcode=2)
    pil = pipe(A, 1.0, 2.0, generator=gens(3, 4), **kw).images
    pt = pipe(A, 1.0, 2.0, generator=gens(3, 4), output_type="pt", **kw).images
    arr = pipe(A, 1.0, 2.0, generator=gens(3, 4), output_type="np", **kw).images
    lat = pipe(A, 1.0, 2.0, generator=gens(3, 4), output_type="latent", **kw).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    assert pt.shape == (2, 3, 32, 32) and arr.shape == (2, 32, 32, 3) and lat.shape == (2, *pipe.latent_shape)
    assert torch.equal(images_uint8(pil), images_uint8(pt)) and torch.equal(images_uint8(pt), images_uint8(arr))
    (tup,) = pipe(A, 1.0, 2.0, generator=gens(3, 4), output_type="pt", return_dict=False, **kw)
    assert torch.equal(tup, pt)


@pytest.mark.parametrize("w", [0.0, 2.0])
@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_an_image_depends_only_on_its_own_inputs(pipe, name: str, w: float) -> None:
    """Batch invariance with generator lists: alone or beside other barcodes, the same bytes."""
    p = pipe.with_scheduler(name)
    kw = dict(num_inference_steps=3, aligner_guidance_scale=w, output_type="pt")
    alone = p(A, 10.0, 20.0, generator=gens(0), **kw).images
    batch = p([A, B, C], [10.0, None, 3.0], [20.0, None, 4.0], generator=gens(0, 1, 2), **kw).images
    assert torch.equal(alone[0], batch[0])
    other = p([B, A], [None, 10.0], [None, 20.0], generator=gens(1, 0), **kw).images
    assert torch.equal(alone[0], other[1]) and torch.equal(batch[1], other[0])
    # one generator is used for every image in turn: n images of one barcode = n barcodes of one image each
    g = torch.Generator().manual_seed(5)
    two = p(A, 10.0, 20.0, num_images_per_barcode=2, generator=g, **kw).images
    g2 = torch.Generator().manual_seed(5)
    same = p([A, A], 10.0, 20.0, generator=[g2, g2], **kw).images
    assert torch.equal(two, same)


@pytest.mark.parametrize("name", ["ddpm", "euler"])
def test_chunk_boundaries_and_shared_generators_change_no_byte(pipe, name: str) -> None:
    """Networks always see micro_batch_size rows, chunks step in lockstep: an image's bytes do not depend on
    where chunk boundaries fall, and a generator shared by a request's images is drawn in the same order."""
    p = pipe.with_scheduler(name)
    p.set_micro_batch_size(2)
    kw = dict(num_inference_steps=3, aligner_guidance_scale=1.0, output_type="pt")
    alone = p(A, 1.0, 2.0, num_images_per_barcode=3, generator=torch.Generator().manual_seed(4), **kw).images
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(8)
    batched = p([B, A, A, A, C], 1.0, 2.0, generator=[gb, ga, ga, ga, gb], **kw).images  # boundaries move
    assert torch.equal(alone, batched[1:4])
    assert p.micro_batch_size == 2 and pipe.micro_batch_size == 4
    with pytest.raises(ValueError, match="micro_batch_size: 0"):
        p.set_micro_batch_size(0)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_gives_finite_images_and_same_seed_same_bytes(pipe, name: str) -> None:
    p = pipe.with_scheduler(name)
    kw = dict(num_inference_steps=4, num_images_per_barcode=2, aligner_guidance_scale=1.0, output_type="pt")
    a = p(A, 1.0, 2.0, generator=torch.Generator().manual_seed(3), **kw).images
    b = p(A, 1.0, 2.0, generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert p.cfg.sampling.scheduler == name and pipe.cfg.sampling.scheduler == CFG.sampling.scheduler


def test_swapping_a_scheduler_by_from_config_works_and_unsupported_ones_are_refused(pipe) -> None:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    p = pipe.with_scheduler("ddim")
    p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    x = p(A, 1.0, 2.0, num_inference_steps=3, generator=gens(0), output_type="pt").images
    assert torch.isfinite(x).all()
    p.scheduler = UniPCMultistepScheduler.from_config(p.scheduler.config)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        p.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        p.scheduler = UniPCMultistepScheduler.from_config(p.scheduler.config, prediction_type="v_prediction")


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_sampling_starts_below_the_last_timestep(name: str) -> None:
    """At t = 999 the default cosine schedule's gamma is 2.4e-9: an x0 estimate there multiplies the
    UNet's eps error by 2e4 (the default model's images were saturated noise). Every sampler starts
    where x0 is well conditioned (25 steps: t = 961; the multistep solvers 951)."""
    from g2p.diffusion.schedule import build_sampling_scheduler

    for cfg in (CFG, preset("default")):
        s = build_sampling_scheduler(cfg.diffusion, name)
        s.set_timesteps(25)
        first = int(s.timesteps[0])
        assert first in (951, 961) and float(s.alphas_cumprod[first]) > 1e-3, (name, first)


def test_w0_is_unguided_bit_for_bit(pipe) -> None:
    """w = 0 never runs the aligner: the same bytes even with the aligner's weights scrambled."""
    kw = dict(num_inference_steps=3, aligner_guidance_scale=0.0, output_type="pt")
    a = pipe(A, 1.0, 2.0, generator=gens(7), **kw).images
    saved = {k: v.clone() for k, v in pipe.aligner.state_dict().items()}
    try:
        for v in pipe.aligner.parameters():
            v.data.normal_()
        b = pipe(A, 1.0, 2.0, generator=gens(7), **kw).images
    finally:
        pipe.aligner.load_state_dict(saved)
    assert torch.equal(a, b)
    guided = pipe(A, 1.0, 2.0, generator=gens(7), num_inference_steps=3, aligner_guidance_scale=3.0,
                  output_type="pt").images
    assert not torch.equal(a, guided)


def test_defaults_come_from_the_saved_sampling_section(pipe) -> None:
    s = pipe.cfg.sampling
    a = pipe(A, generator=gens(1), output_type="pt").images
    b = pipe(A, generator=gens(1), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
             aligner_guidance_scale=s.aligner_guidance_scale, output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("call, match", [
    (dict(barcode="ACGTXYZ" * 40), r"barcode='ACGTXYZ.*"),
    (dict(barcode=["ACGT" * 100, "ACGT" * 10]), r"barcode\[1\]"),
    (dict(barcode=A, latitude=91.0, longitude=0.0), r"latitude.*91"),
    (dict(barcode=[A, B], latitude=[1.0], longitude=[1.0, 2.0]), r"latitude: 1 values for 2 barcodes"),
    (dict(barcode=A, num_inference_steps=0), r"num_inference_steps: 0"),
    (dict(barcode=A, num_images_per_barcode=0), r"num_images_per_barcode: 0"),
    (dict(barcode=A, guidance_scale=float("nan")), r"guidance_scale: nan"),
    (dict(barcode=A, output_type="jpeg"), r"output_type: 'jpeg'"),
    (dict(barcode=[A, B], generator=[torch.Generator()]), r"generator: a list of 1 generators for 2 images"),
    (dict(barcode=[]), r"barcode: \[\]"),
])
def test_bad_input_names_field_and_value_before_any_compute(pipe, call: dict, match: str, monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("the conditioner ran before the input was checked")

    monkeypatch.setattr(pipe, "encode_condition", fail)
    with pytest.raises(ValueError, match=match):
        pipe(**call)


def test_save_and_load_round_trip_gives_identical_images(pipe, tmp_path: Path) -> None:
    import json

    from transformers import AutoTokenizer

    import g2p  # noqa: F401 (registers KmerTokenizer with AutoTokenizer)

    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert {"tokenizer", "conditioner", "vae", "unet", "aligner", "scheduler"} <= set(index)
    assert index["conditioner"][0].startswith("g2p") and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert list((tmp_path / "p" / "unet").glob("*.safetensors")) and not list((tmp_path / "p").rglob("*.bin"))
    loaded = G2PDiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    kw = dict(num_inference_steps=3, num_images_per_barcode=2, aligner_guidance_scale=1.5, output_type="pt")
    assert torch.equal(pipe(A, 3.0, 4.0, generator=gens(0, 1), **kw).images,
                       loaded(A, 3.0, 4.0, generator=gens(0, 1), **kw).images)
    assert torch.equal(loaded.aligner.negative_bank, pipe.aligner.negative_bank)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "p" / "tokenizer"))
    assert type(tok).__name__ == "KmerTokenizer" and tok.k == CFG.tokenizer.k
    assert load_pipeline(str(tmp_path / "p")).cfg == pipe.cfg
    # folders written before the components moved to g2p.components name g2p.pipeline: they still load
    idx = tmp_path / "p" / "model_index.json"
    old = json.loads(idx.read_text())
    for part in ("conditioner", "aligner"):
        old[part][0] = "g2p.pipeline"
    idx.write_text(json.dumps(old))
    assert torch.equal(G2PDiffusionPipeline.from_pretrained(str(tmp_path / "p")).aligner.negative_bank,
                       pipe.aligner.negative_bank)
    small = pipe.with_scheduler("ddim")
    small.set_micro_batch_size(3)
    small.save_pretrained(tmp_path / "q")
    assert G2PDiffusionPipeline.from_pretrained(str(tmp_path / "q")).micro_batch_size == 3


def test_the_fused_unet_predicts_what_the_training_denoiser_does() -> None:
    torch.manual_seed(0)
    model = G2PDiffusion(CFG)
    model.add_lora()
    with torch.no_grad():
        for n, p in model.denoiser.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a non-zero adapter, so fusing matters
    p = G2PDiffusionPipeline.from_model(model)
    x, t = torch.randn(2, *p.latent_shape), torch.tensor([10, 500])
    ctx = torch.randn(2, 5, CFG.conditioner.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        want = model.eval().denoiser(x, t, ctx, mask)
        got = p.predict_noise(x, t, ctx, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_guidance_reads_gamma_t_of_the_step_being_taken(name: str) -> None:
    """For each scheduler, the gamma_t guidance uses is the one its model input is scaled by:
    scale_model_input(x) = sqrt(gamma_t) x in sigma space (Euler), x itself in VP space (gamma_t at t)."""
    from g2p.diffusion.schedule import build_sampling_scheduler
    from g2p.pipeline import current_alpha_bar

    sched = build_sampling_scheduler(CFG.diffusion, name)
    sched.set_timesteps(6)
    ac = sched.alphas_cumprod
    x = torch.ones(1, 1, 2, 2) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        got = float(current_alpha_bar(sched, t, ac))
        if sched.init_noise_sigma > 1:  # sigma space: the model input is sqrt(gamma_t) x
            assert float(x_in.flatten()[0]) == pytest.approx(float(x.flatten()[0]) * got ** 0.5, rel=1e-4)
        else:  # VP space: the model input is x, gamma_t the table's at t
            assert torch.equal(x_in, x) and got == pytest.approx(float(ac[int(t)]), rel=1e-6), (name, int(t))
        sched.step(torch.zeros_like(x), t, x)


def test_alpha_bar_is_exact_at_integers_and_monotone_between() -> None:
    from g2p.diffusion.schedule import build_train_scheduler

    ac = build_train_scheduler(CFG.diffusion).alphas_cumprod
    assert torch.equal(alpha_bar_at(ac, torch.tensor([10, 500])), ac[[10, 500]].float())
    mid = alpha_bar_at(ac, torch.tensor([10.5]))
    assert ac[11] < mid < ac[10]
