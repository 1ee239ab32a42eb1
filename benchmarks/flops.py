"""FLOPs to generate one image with :class:`~g2p.pipeline.G2PDiffusionPipeline`, and the GPU time they project to.

    python -m benchmarks.flops                                   # default preset, random weights
    python -m benchmarks.flops --model models/g2pdiffusion       # a saved pipeline
    python -m benchmarks.flops --preset paper --measure-steps 1  # SD 1.x sizes at 256 px, one step scaled
    python -m benchmarks.flops --images 1000000 --gpus 8 --peak-flops 989e12 --mfu 0.4

FLOPs are counted, not estimated from hand formulas: :func:`image_flops` runs
the real pipeline call for one image under ``torch.utils.flop_counter.
FlopCounterMode``, which counts every matmul, convolution and attention kernel
that runs (forward and, for the aligner's guidance gradient, backward) from
its shapes. Elementwise work (norms, activations, the scheduler) is not
counted, as in every FLOP/MFU figure. FLOPs depend on shapes only, so a
pipeline with random weights counts the same as a trained one of its
architecture.

Each FLOP is attributed to the component that was running when it ran:
``conditioner`` (barcode + place -> context, once per image), ``unet`` (every
denoising step; with ``guidance_scale != 1`` a step is one UNet pass over two
rows, the conditional and the null condition), ``aligner`` (with
``aligner_guidance_scale != 0``: the aligner's forward and the backward to
its input, eq. 8, every step) and ``vae_decode`` (once per image).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from g2p.config import G2PConfig, preset
from g2p.model import G2PDiffusion
from g2p.pipeline import G2PDiffusionPipeline, load_pipeline

PARTS = ("conditioner", "unet", "aligner", "vae_decode")
PER_STEP = ("unet", "aligner")  # the parts that run at every denoising step
BARCODE = "ACGT" * 165  # 660 nt: tokenized to the tokenizer's fixed length whatever its length


# ----------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------


def _sdpa(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
          out_shape: torch.Size | None = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size,
                   value_shape: torch.Size, *args: Any, out_shape: torch.Size | None = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch registers its attention formulas for the CUDA kernels only; on a CPU scaled_dot_product_attention runs
# this kernel, which would otherwise count 0. Same formula as torch's for the flash kernel.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


class _NoModuleTracking(contextlib.nullcontext):
    """Stands in for FlopCounterMode's module tracker: every FLOP is counted under ``Global`` only.

    Why: the tracker hooks every module input that requires grad, and that
    makes the aligner's ``torch.autograd.grad`` with respect to its leaf input
    fail ("A leaf node was passed to _will_engine_execute_node",
    pytorch/pytorch#131753, torch >= 2.4). Components are attributed by
    :func:`_attributed` instead, which also names them by role rather than
    by class (``vae.decode`` is no module's forward).
    """

    parents = frozenset({"Global"})


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts CPU attention and lets ``torch.autograd.grad`` run inside it."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    if not hasattr(counter, "mod_tracker"):
        raise RuntimeError(f"torch {torch.__version__}: FlopCounterMode has no mod_tracker to replace")
    counter.mod_tracker = _NoModuleTracking()
    return counter


def _counted(counter: FlopCounterMode, flops: dict[str, float], part: str, fn: Callable) -> Callable:
    """``fn``, adding the FLOPs counted while it runs (backward included) to ``flops[part]``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = counter.get_total_flops()
        out = fn(*args, **kwargs)
        flops[part] += counter.get_total_flops() - before
        return out

    return run


@contextlib.contextmanager
def _patched(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """``obj.name`` replaced by ``wrap(obj.name)`` on the instance, restored on exit."""
    own = obj.__dict__.get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


@contextlib.contextmanager
def _attributed(pipe: G2PDiffusionPipeline, counter: FlopCounterMode, flops: dict[str, float]) -> Iterator[None]:
    """While open, the FLOPs of each component's entry point are added to its part of ``flops``.

    The aligner's entry point is the guidance function ``aligner.cond_fn()``
    builds: its forward and its ``torch.autograd.grad`` both run inside it.
    """
    def cond_fn(make: Callable) -> Callable:
        return lambda: _counted(counter, flops, "aligner", make())

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(pipe.conditioner, "forward",
                                     functools.partial(_counted, counter, flops, "conditioner")))
        stack.enter_context(_patched(pipe.unet, "forward", functools.partial(_counted, counter, flops, "unet")))
        stack.enter_context(_patched(pipe.aligner, "cond_fn", cond_fn))
        stack.enter_context(_patched(pipe.vae, "decode", functools.partial(_counted, counter, flops, "vae_decode")))
        yield


def image_flops(pipe: G2PDiffusionPipeline, steps: int, guidance_scale: float,
                aligner_guidance_scale: float) -> dict[str, float]:
    """FLOPs to generate one image, by component (:data:`PARTS`) and ``total``.

    Runs ``pipe(barcode, num_images_per_barcode=1, ...)`` once under
    :func:`flop_counter`, with the micro-batch size set to 1 for the call (and
    restored after), so no padded row is counted. ``total`` is everything
    counted during the call; with the pipeline as it is, every counted FLOP
    belongs to one of the parts, so ``total`` is their sum. The components'
    entry points are wrapped on ``pipe`` during the call: not for a pipeline
    that other threads are calling meanwhile.
    """
    flops = dict.fromkeys(PARTS, 0.0)
    counter = flop_counter()
    size = pipe.micro_batch_size
    pipe.set_micro_batch_size(1)
    try:
        with _attributed(pipe, counter, flops), counter:
            pipe(BARCODE, num_images_per_barcode=1, num_inference_steps=steps, guidance_scale=guidance_scale,
                 aligner_guidance_scale=aligner_guidance_scale, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
    finally:
        pipe.set_micro_batch_size(size)
    return {**flops, "total": float(counter.get_total_flops())}


def model_evaluations(pipe: G2PDiffusionPipeline, steps: int) -> int:
    """Denoising iterations of a ``steps``-step call: one per scheduler timestep (2 steps - 1 for Heun)."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def scaled_to_steps(pipe: G2PDiffusionPipeline, flops: dict[str, float], measured_steps: int,
                    steps: int) -> dict[str, float]:
    """:func:`image_flops` measured at ``measured_steps`` steps, as it would be at ``steps``.

    Exact, not an approximation: every iteration runs the same UNet and
    aligner shapes (tests/test_flops.py checks that FLOPs are linear in the
    iterations), so the per-step parts scale with the number of iterations and
    the conditioner and the VAE decode, which run once per image, do not.
    Why: a paper-size pipeline counts one step on a CPU in seconds, fifty in minutes.
    """
    ratio = model_evaluations(pipe, steps) / model_evaluations(pipe, measured_steps)
    out = {k: flops[k] * ratio if k in PER_STEP else flops[k] for k in PARTS}
    return {**out, "total": flops["total"] + sum(out[k] - flops[k] for k in PER_STEP)}


def projected_seconds(flops_per_image: float, images: int, gpus: int, peak_flops: float, mfu: float) -> float:
    """Wall seconds to generate ``images`` images on ``gpus`` accelerators.

        seconds = flops_per_image * images / (gpus * peak_flops * mfu)

    ``peak_flops`` is one accelerator's peak FLOP/s in the dtype the pipeline
    runs in (dense, no sparsity); ``mfu`` is the fraction of that peak the
    pipeline achieves, 0 < mfu <= 1. Images are assumed to split evenly over
    the accelerators with no other overhead (loading, I/O, host work).
    """
    if images < 0 or gpus < 1 or peak_flops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"images={images}, gpus={gpus}, peak_flops={peak_flops}, mfu={mfu}: need images >= 0, "
                         f"gpus >= 1, peak_flops > 0 and 0 < mfu <= 1")
    return flops_per_image * images / (gpus * peak_flops * mfu)


# ----------------------------------------------------------------------------
# pipelines to count
# ----------------------------------------------------------------------------


def random_pipeline(cfg: G2PConfig, seed: int = 0) -> G2PDiffusionPipeline:
    """The pipeline of ``cfg`` with random weights, LoRA (and the pooled embedding where ``cfg`` has one)
    fused, and a random negative bank of ``sampling.negative_bank_size`` rows: the shapes a trained model
    of ``cfg`` has. The VAE and UNet are loaded from ``cfg.*.pretrained_path`` where it is set."""
    torch.manual_seed(seed)
    model = G2PDiffusion(cfg)
    model.add_lora()
    model.negative_bank = torch.randn(cfg.sampling.negative_bank_size, cfg.conditioner.hidden_size)
    return G2PDiffusionPipeline.from_model(model)


def paper_pipeline(sd_folder: str | Path | None = None) -> G2PDiffusionPipeline:
    """The ``paper`` preset's pipeline (256 px, 32 x 32 latents) with random weights.

    Without ``sd_folder`` the VAE and UNet are built from the preset's own
    fields, which are Stable Diffusion 1.x's architecture (UNet widths
    320-1280, VAE 128-512, cross-attention 768), so no SD download is needed
    to count its FLOPs; with one (a diffusers SD folder, e.g. the stand-in
    tests/test_paper_preset.py writes) they are loaded from it, as training
    does. About 4 GB of float32 weights, twice that while the pipeline is
    copied out of the model.
    """
    folder = "" if sd_folder is None else str(sd_folder)
    return random_pipeline(preset("paper").override({"vae": {"pretrained_path": folder},
                                                      "unet": {"pretrained_path": folder}}))


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default", choices=["tiny", "default", "paper"],
                    help="count a random-weight pipeline of this preset (ignored with --model)")
    ap.add_argument("--model", help="count this saved pipeline (g2p.pipeline.load_pipeline) instead")
    ap.add_argument("--sd-folder", help="with --preset paper: load the VAE and UNet from this SD folder")
    ap.add_argument("--steps", type=int, help="default: the model's sampling.steps")
    ap.add_argument("--guidance-scale", type=float, help="default: the model's sampling.guidance_scale")
    ap.add_argument("--aligner-guidance-scale", type=float,
                    help="default: the model's sampling.aligner_guidance_scale")
    ap.add_argument("--measure-steps", type=int, help="count this many steps and scale to --steps (default: --steps)")
    ap.add_argument("--images", type=int, help="also project the seconds to generate this many images")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--peak-flops", type=float, help="one accelerator's peak FLOP/s (needed with --images)")
    ap.add_argument("--mfu", type=float, help="fraction of peak achieved (needed with --images)")
    args = ap.parse_args(argv)
    if args.images is not None and (args.peak_flops is None or args.mfu is None):
        ap.error("--images needs --peak-flops and --mfu")
    if args.model:
        pipe, name = load_pipeline(args.model), args.model
    elif args.preset == "paper":
        pipe, name = paper_pipeline(args.sd_folder), "paper (random weights)"
    else:
        pipe, name = random_pipeline(preset(args.preset)), f"{args.preset} (random weights)"
    s = pipe.cfg.sampling
    steps = s.steps if args.steps is None else args.steps
    cfg_scale = s.guidance_scale if args.guidance_scale is None else args.guidance_scale
    w = s.aligner_guidance_scale if args.aligner_guidance_scale is None else args.aligner_guidance_scale
    measured = steps if args.measure_steps is None else args.measure_steps
    flops = scaled_to_steps(pipe, image_flops(pipe, measured, cfg_scale, w), measured, steps)
    size = pipe.vae.config.sample_size
    print(f"{name}: {size} px, {steps} steps ({pipe.scheduler.__class__.__name__}, counted at {measured}), "
          f"guidance_scale {cfg_scale}, aligner_guidance_scale {w}")
    print(f"{'part':<12} {'GFLOP/image':>14} {'share':>7}")
    for k in (*PARTS, "total"):
        print(f"{k:<12} {flops[k] / 1e9:>14.2f} {flops[k] / flops['total']:>7.1%}")
    if args.images is not None:
        sec = projected_seconds(flops["total"], args.images, args.gpus, args.peak_flops, args.mfu)
        print(f"{args.images} images on {args.gpus} x {args.peak_flops:.3g} FLOP/s at MFU {args.mfu}: "
              f"{sec:.1f} s ({sec / 3600:.2f} h)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
