"""Ray Train overhead: samples per second of each training stage, plain loop vs Ray workers.

For each stage the same stage function runs three ways on the same config and
data: in this process (no Ray), on 1 Ray worker and on 2 Ray workers (DDP,
gloo), each process with ``--threads`` torch threads (and as many Ray CPUs).
One thread by default: on a shared 2-core machine, OpenMP with more threads
than free cores collapses (tiny train_diffusion: 277 samples/s on 1 thread,
4 on 2 threads under a load of 5), which would measure the neighbours.
Throughput is the steady state: total samples over total time of the logged
intervals after the first (warm-up), time spent in hooks (``ray.train.report``,
the step log) included. The three runs alternate ``--repeats`` times and the
best of each is kept, so a burst of load from other processes hurts all three
alike. Ray's start-up (``ray.init``) and each run's fixed cost (worker
processes, imports, data and model loading, the final checkpoint: fit wall
time minus the training time the workers measured) are reported apart.
Goal: at 1 worker, Ray costs at most 10% of the plain loop's throughput.

    python benchmarks/bench_ray.py [--preset tiny] [--batch 32] [--steps 40] [--threads 1] [--repeats 2]
                                   [--stages ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from g2p.config import G2PConfig, preset
from g2p.data.dataset import Arrays
from g2p.train.loop import Hooks

ALL_STAGES = ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner")
WARMUP_INTERVALS = 1


def make_data(n: int, image_size: int, seed: int = 0) -> Arrays:
    """``n`` records of two barcode families with a coloured square per family (as the tests)."""
    rng = np.random.default_rng(seed)
    base = ["".join(rng.choice(list("ACGT"), 650)) for _ in range(2)]
    barcodes, images = [], np.full((n, 3, image_size, image_size), 200, dtype=np.uint8)
    q = image_size // 4
    for i in range(n):
        seq = list(base[i % 2])
        for p in rng.choice(650, 8, replace=False):
            seq[p] = "ACGT"[rng.integers(4)]
        barcodes.append("".join(seq))
        images[i, i % 2, q:3 * q, q:3 * q] = 30
    return Arrays(processid=np.array([f"B{i}" for i in range(n)]), barcode=barcodes,
                  lat=torch.linspace(-60, 60, n), lon=torch.linspace(-120, 120, n),
                  has_place=torch.ones(n, dtype=torch.bool),
                  species=np.array([f"s{i % 2}" for i in range(n)], dtype=object),
                  images=torch.from_numpy(images))


def steady_rate(rates: list[float]) -> float:
    """Samples/s over the intervals after warm-up (equal samples per interval: a harmonic mean)."""
    kept = rates[WARMUP_INTERVALS:] or rates
    return len(kept) / sum(1.0 / r for r in kept)


def bench_config(cfg: G2PConfig, stage: str, steps: int, log_every: int, batch: int | None = None) -> G2PConfig:
    # no checkpoint inside the timed window: only the final one, after the last interval
    knobs = {"steps": steps, "log_every": log_every, "checkpoint_every": steps + 1, "warmup_steps": 0}
    return cfg.override({stage: {**knobs, **({"batch_size": batch} if batch else {})}})


def run_plain(stage: str, cfg: G2PConfig, data: Arrays, threads: int) -> float:
    """Steady-state samples/s of the stage function in this process."""
    from g2p.model import G2PDiffusion
    from g2p.train import stages

    torch.set_num_threads(threads)
    tcfg = getattr(cfg, stage)
    torch.manual_seed(tcfg.seed)
    model = G2PDiffusion(cfg)
    rates: list[float] = []
    kw = dict(hooks=Hooks(on_step=[lambda s, m: rates.append(m["samples_per_s"])]), progress=False)
    if stage == "pretrain_conditioner":
        stages.pretrain_conditioner(model, data, tcfg, **kw)
    elif stage == "train_vae":
        stages.train_vae(model, data, tcfg, **kw)
    else:
        latents = stages.encode_latents(model, data.images)
        if stage == "train_base":
            stages.train_base(model, data, tcfg, latents=latents, **kw)
        elif stage == "train_diffusion":
            stages.train_diffusion(model, data, tcfg, latents=latents, **kw)
        else:
            stages.train_aligner(model, data, tcfg, latents=latents, **kw)
    return steady_rate(rates)


def run_ray(stage: str, cfg: G2PConfig, data_file: Path, workers: int, cpus: int, storage: Path) -> tuple[float, float]:
    """(steady-state global samples/s, fixed cost in s) of the stage on Ray workers."""
    from pipelines.ray_train import RaySection, run_stage

    run = run_stage(stage, cfg, data=data_file, run_name=f"{stage}-{workers}w", storage_path=storage,
                    scaling=RaySection(num_workers=workers, cpus_per_worker=cpus, max_failures=0))
    rows = [r for r in run.log() if r["event"] == "step"]
    rate = steady_rate([r["global_samples_per_s"] for r in rows])
    return rate, run.seconds - rows[-1]["elapsed_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="model sizes (tiny: 2-core friendly; default: slow here)")
    ap.add_argument("--batch", type=int, default=32, help="global batch size of every stage (0: the preset's)")
    ap.add_argument("--steps", type=int, default=40, help="steps per run (first log interval is warm-up)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per process")
    ap.add_argument("--stages", nargs="+", default=list(ALL_STAGES), choices=ALL_STAGES)
    ap.add_argument("--quick", action="store_true", help="two stages, batch 8, 15 steps, once (a smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.steps, a.records, a.repeats = 8, 15, 32, 1
        a.stages = [s for s in a.stages if s in ("pretrain_conditioner", "train_diffusion")] or a.stages[:1]
    import ray

    from pipelines.ray_train import ensure_ray, save_arrays

    cores = os.cpu_count() or 1
    base = preset(a.preset)
    data = make_data(a.records, base.vae.image_size)
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    data_file = save_arrays(data, work / "arrays.safetensors")
    started_here = not ray.is_initialized()
    rows = []
    try:
        init_s = ensure_ray(num_cpus=cores)
        for s in a.stages:
            cfg = bench_config(base, s, a.steps, a.log_every, a.batch or None)
            best = [0.0, 0.0, 0.0]
            fixed = [float("inf"), float("inf")]
            for r in range(a.repeats):
                best[0] = max(best[0], run_plain(s, cfg, data, a.threads))
                for i, workers in enumerate((1, 2)[: 1 + (cores >= 2 * a.threads)]):
                    rate, f = run_ray(s, cfg, data_file, workers, a.threads, work / f"r{r}")
                    best[i + 1], fixed[i] = max(best[i + 1], rate), min(fixed[i], f)
            rows.append((s, getattr(cfg, s).batch_size, *best, *fixed))
        threads = torch.get_num_threads()
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print(f"Ray Train overhead, preset {a.preset!r}, {a.steps} steps (log every {a.log_every}), {cores} cores, "
          f"best of {a.repeats}; samples/s in steady state, {threads} torch thread(s) per process; "
          f"load average now {os.getloadavg()[0]:.1f}")
    head = f"{'stage':22} {'batch':>5} {'plain':>8} {'ray 1w':>8} {'ratio':>6} {'ray 2w':>8} {'ratio':>6} {'fixed 1w':>9} {'fixed 2w':>9}"
    print(head)
    print("-" * len(head))
    for s, b, p, one, two, f1, f2 in rows:
        print(f"{s:22} {b:5d} {p:8.1f} {one:8.1f} {one / p:6.2f} {two:8.1f} {two / p:6.2f} {f1:8.1f}s {f2:8.1f}s")
    print(f"ray.init: {init_s:.1f} s (once); fixed = fit wall time minus the workers' training time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
