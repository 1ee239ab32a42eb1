"""Model speed and memory: training steps of every stage, and sampling, per preset.

For each preset (``tiny``, ``default``) a randomly initialised model is timed
on random barcodes (658 nt), places and images (no data set needed), with
each stage's own ``TrainConfig`` batch size, in pipeline order:

    conditioner MLM -> VAE -> base UNet -> LoRA + conditioner -> aligner

A training step is one ``fit`` step (forward, backward, clipping, AdamW,
EMA where the stage has one), timed between consecutive ``on_step`` hooks
after a warm-up step. Sampling is the ``G2PDiffusionPipeline`` with 25 DDIM steps
and CFG 3, unguided (w = 0) and aligner-guided (w = 1), VAE decoding
included, reported per image; the two are timed alternately in one run, so
that load from other processes hits both alike, and the ratio guided /
unguided has a goal of <= 1.5.

Each figure is the best of its repeats (as ``timeit`` and bench_tokenizer
report), samples/s = batch / best; the median stands beside it. Why best:
two torch threads on two shared cores slow down many-fold whenever another
process takes a core (their barriers wait for a descheduled thread), and the
best repeat is the one least disturbed. ``cpu`` is the median process CPU
time per unit, all threads together: the work done, which load changes far
less than wall time (quiet, with 2 threads, cpu ~ 2 x wall). On a loaded
machine ``--threads 1`` gives the steadiest figures, and the guided /
unguided ratio is also printed from CPU time.

Peak memory is the peak resident set size during each piece (Linux: the
``VmHWM`` counter, reset per piece through ``/proc/self/clear_refs``;
elsewhere the process-wide ``ru_maxrss``). The 1-minute load average is
printed beside every row: on a shared 2-core machine, figures taken under a
load above ~1 are slower than the model is.

    python -m benchmarks model [--quick]
    python -m benchmarks.bench_model [--quick] [--presets tiny default] [--steps 8] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from g2p.config import G2PConfig, TrainConfig, preset
from g2p.data.dataset import Arrays
from g2p.pipeline import G2PDiffusionPipeline, generate_uint8
from g2p.model import G2PDiffusion
from g2p.train import stages
from g2p.train.loop import Hooks

BARCODE_NT = 658
SAMPLING_STEPS = 25
CFG_SCALE = 3.0
GUIDANCE_SCALE = 1.0
GUIDED_GOAL = 1.5  # guided sampling may cost at most this many times unguided


@dataclass
class Row:
    """One measured piece: seconds per unit (a training step or one image)."""

    preset: str
    piece: str
    batch: int
    seconds: float  # best repeat: per training step, or per sampled image
    median_seconds: float
    cpu_seconds: float  # median process CPU time per unit, all threads
    unit: str  # "step" or "image"
    samples_per_s: float
    peak_rss_mib: float
    load1: float


# ----------------------------------------------------------------------------
# inputs and measuring
# ----------------------------------------------------------------------------


def random_arrays(n: int, image_size: int, seed: int = 0) -> Arrays:
    """``n`` random records: ACGT barcodes, places, uint8 images (shapes matter here, not content)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, (n, BARCODE_NT))]
    return Arrays(
        processid=np.array([f"B{i}" for i in range(n)]),
        barcode=[row.tobytes().decode("ascii") for row in letters],
        lat=torch.from_numpy(rng.uniform(-60, 60, n).astype(np.float32)),
        lon=torch.from_numpy(rng.uniform(-180, 180, n).astype(np.float32)),
        has_place=torch.ones(n, dtype=torch.bool),
        species=np.array([f"sp{i % 8}" for i in range(n)], dtype=object),
        images=torch.from_numpy(rng.integers(0, 256, (n, 3, image_size, image_size), dtype=np.uint8)),
    )


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def time_training(run: Callable[[TrainConfig, Hooks, int], object], cfg: TrainConfig,
                  warmup: int, steps: int) -> tuple[float, float, float, float]:
    """Best and median wall, median CPU seconds per step after ``warmup`` steps, and peak RSS (MiB).

    ``run(cfg, hooks, until)`` calls the stage; ``on_step`` fires after every
    step (``log_every = 1``), and the gaps between hooks are whole steps.
    """
    stamps: list[tuple[float, float]] = []
    hooks = Hooks(on_step=[lambda step, metrics: stamps.append((time.perf_counter(), time.process_time()))])
    total = warmup + steps
    tc = replace(cfg, steps=max(cfg.steps, total + 1), log_every=1, checkpoint_every=10**9)
    _reset_peak()
    run(tc, hooks, total)
    gaps = np.diff(np.array(stamps[max(0, warmup - 1):]), axis=0)  # (steps, 2): wall, cpu
    return float(gaps[:, 0].min()), float(np.median(gaps[:, 0])), float(np.median(gaps[:, 1])), _peak_rss_mib()


def time_sampling(pipe: G2PDiffusionPipeline, data: Arrays, conditions: int, per_condition: int,
                  repeats: int) -> dict[str, tuple[float, float, float, float]]:
    """Best and median wall, median CPU seconds per image over ``repeats``, and peak RSS, unguided and guided.

    The two alternate within each repeat, so slow spells from other processes
    fall on both; one untimed call first warms both paths up.
    """
    args = (data.barcode[:conditions], data.lat[:conditions].tolist(), data.lon[:conditions].tolist())
    scales = {"sample unguided": 0.0, "sample guided": GUIDANCE_SCALE}
    times: dict[str, list[float]] = {k: [] for k in scales}
    cpu: dict[str, list[float]] = {k: [] for k in scales}
    peaks: dict[str, float] = {}
    for name, w in scales.items():  # warm-up
        generate_uint8(pipe, *args, per_condition, num_inference_steps=2, aligner_guidance_scale=w,
                       guidance_scale=CFG_SCALE)
    for r in range(repeats):
        for name, w in scales.items():
            _reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            generate_uint8(pipe, *args, per_condition, seed=r, num_inference_steps=SAMPLING_STEPS,
                           aligner_guidance_scale=w, guidance_scale=CFG_SCALE)
            times[name].append((time.perf_counter() - t0) / (conditions * per_condition))
            cpu[name].append((time.process_time() - c0) / (conditions * per_condition))
            peaks[name] = max(peaks.get(name, 0.0), _peak_rss_mib())
    return {k: (min(v), statistics.median(v), statistics.median(cpu[k]), peaks[k]) for k, v in times.items()}


# ----------------------------------------------------------------------------
# one preset
# ----------------------------------------------------------------------------


def bench_preset(name: str, *, warmup: int = 1, steps: int = 8, conditions: int = 4, per_condition: int = 4,
                 repeats: int = 3, report: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every training stage's step and both sampling modes for preset ``name``; rows in pipeline order."""
    cfg: G2PConfig = preset(name)
    torch.manual_seed(0)
    model = G2PDiffusion(cfg, from_pretrained=False)
    n = max(getattr(cfg, s).batch_size for s in
            ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner"))
    data = random_arrays(max(n, conditions), cfg.vae.image_size)
    rows: list[Row] = []

    def add(piece: str, batch: int, best: float, median: float, cpu: float, unit: str, peak: float) -> None:
        per_s = (batch if unit == "step" else 1) / best
        rows.append(Row(name, piece, batch, best, median, cpu, unit, per_s, peak, os.getloadavg()[0]))
        report(rows[-1])

    def train(piece: str, tc: TrainConfig, run: Callable[[TrainConfig, Hooks, int], object]) -> None:
        best, median, cpu, peak = time_training(run, tc, warmup, steps)
        add(piece, min(tc.batch_size, len(data)), best, median, cpu, "step", peak)

    kw = dict(progress=False)
    train("conditioner MLM", cfg.pretrain_conditioner,
          lambda tc, h, u: stages.pretrain_conditioner(model, data, tc, hooks=h, until=u, **kw))
    train("VAE", cfg.train_vae, lambda tc, h, u: stages.train_vae(model, data, tc, hooks=h, until=u, **kw))
    latents = stages.encode_latents(model, data.images)
    train("base UNet", cfg.train_base,
          lambda tc, h, u: stages.train_base(model, data, tc, latents=latents, hooks=h, until=u, **kw))
    train("LoRA + conditioner", cfg.train_diffusion,
          lambda tc, h, u: stages.train_diffusion(model, data, tc, latents=latents, hooks=h, until=u, **kw))
    train("aligner", cfg.train_aligner,
          lambda tc, h, u: stages.train_aligner(model, data, tc, latents=latents, hooks=h, until=u, **kw))
    sampled = time_sampling(G2PDiffusionPipeline.from_model(model), data, conditions, per_condition, repeats)
    for piece, (best, median, cpu, peak) in sampled.items():
        add(piece, conditions * per_condition, best, median, cpu, "image", peak)
    return rows


def parameter_counts(name: str) -> dict[str, float]:
    """Millions of parameters per component of preset ``name`` (LoRA not added)."""
    model = G2PDiffusion(preset(name), from_pretrained=False)
    return {c: sum(p.numel() for p in getattr(model, c).parameters()) / 1e6
            for c in ("conditioner", "vae", "denoiser", "aligner")}


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

HEADER = (f"| {'preset':<7} | {'piece':<19} | {'batch':>5} | {'best':>14} | {'median':>7} | {'cpu':>7} "
          f"| {'samples/s':>9} | {'peak RSS MiB':>12} | {'load1':>5} |")


def format_row(r: Row) -> str:
    best = f"{r.seconds:.3f} s/{r.unit}"
    return (f"| {r.preset:<7} | {r.piece:<19} | {r.batch:>5} | {best:>14} | {r.median_seconds:>7.3f} "
            f"| {r.cpu_seconds:>7.3f} | {r.samples_per_s:>9.1f} | {r.peak_rss_mib:>12.0f} | {r.load1:>5.2f} |")


def ratios(rows: list[Row]) -> list[str]:
    """Guided / unguided sampling and LoRA / base step, per preset."""
    out = []
    for name in dict.fromkeys(r.preset for r in rows):
        by = {r.piece: r for r in rows if r.preset == name}
        g = by["sample guided"].seconds / by["sample unguided"].seconds
        g_cpu = by["sample guided"].cpu_seconds / by["sample unguided"].cpu_seconds
        verdict = "meets" if g <= GUIDED_GOAL else "MISSES"
        out.append(f"{name}: guided / unguided sampling = {g:.2f}x wall, {g_cpu:.2f}x CPU "
                   f"({verdict} the goal <= {GUIDED_GOAL}x); "
                   f"LoRA + conditioner / base UNet step = "
                   f"{by['LoRA + conditioner'].seconds / by['base UNet'].seconds:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset only, 2 timed steps, 1 sampling repeat")
    ap.add_argument("--presets", nargs="+", default=None, help="default: tiny default (quick: tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per stage (default 8)")
    ap.add_argument("--repeats", type=int, default=None, help="sampling repeats per mode (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.presets or (["tiny"] if args.quick else ["tiny", "default"])
    steps = args.steps or (2 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"model benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"sampling: DDIM {SAMPLING_STEPS} steps, CFG {CFG_SCALE}, guided w={GUIDANCE_SCALE}")
    for name in names:
        sizes = ", ".join(f"{k} {v:.2f} M" for k, v in parameter_counts(name).items())
        print(f"  {name}: {sizes} parameters")
    print(HEADER)
    print("|" + "|".join("-" * (len(c)) for c in HEADER.split("|")[1:-1]) + "|")
    rows: list[Row] = []
    for name in names:
        rows += bench_preset(name, steps=steps, repeats=repeats, report=lambda r: print(format_row(r), flush=True))
    for line in ratios(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
