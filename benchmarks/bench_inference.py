"""Batch inference (``g2p predict``, the evaluate stage's machinery): throughput, memory, resume, and the
cost of the paper's full tables.

    python -m benchmarks inference                      # models/g2pdiffusion (+ models/judge)
    python -m benchmarks inference --model M --judge J --steps 2 --sizes 1000 10000
    python -m benchmarks inference --quick              # a smoke run: small sizes, no paper preset

Four parts, each printed as JSON lines and a summary:

1. **images/s, 1 vs 2 actors**, side by side on the same input (one CPU and
   one torch thread per actor): the pool's wall rate (actor start-up
   included) and its busy rate (images / the busiest actor's seconds of
   shard work).
2. **Peak memory at 1 k and 10 k barcodes**: ``g2p predict`` as a user runs
   it (a subprocess), sampled every 0.2 s: the driver's RSS, and the largest
   descendant's (an actor, the raylet...) RSS and private memory (RSS less
   shared pages: object-store pages a worker maps belong to the store). The
   10 k table carries 20 invalid rows: 10 k records out, 20 errors.
3. **Interrupted and resumed**: the 10 k prediction killed (SIGINT) once half
   its files exist, then rerun: the files written before are skipped.
4. **The paper's full tables, projected**: FLOPs per image counted on the
   real pipeline (:mod:`benchmarks.flops`: UNet passes x steps x CFG, the
   aligner's forward + backward, VAE decode) for this model with its
   sampler (#7's choice) and for the ``paper`` preset at 256 px; the time of
   the full evaluation (39,373 seen + 7,887 unseen test barcodes x 100
   samples x 2 generated rows) on N GPUs at a stated peak and MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.bench_scale import PeakRSS

ROOT = Path(__file__).resolve().parents[1]
FULL_TABLE_BARCODES = 39_373 + 7_887  # BIOSCAN-5M's test + test_unseen barcodes (ANCHORS.md)
FULL_TABLE_IMAGES = FULL_TABLE_BARCODES * 100 * 2  # 100 samples each, no_aligner and g2pdiffusion
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM
ASSUMED_MFU = 0.35  # a stated assumption until a GPU run measures it


def make_table(path: Path, rows: int, invalid: int, seed: int = 0) -> None:
    """``rows`` records of valid barcodes (300-658 nt) and places, ``invalid`` of them broken (spread evenly):
    a bad character, a short barcode, a latitude out of range, a negative seed, in turn."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(300, 659, rows)
    alphabet = np.frombuffer(b"ACGT", dtype=np.uint8)
    barcodes = [alphabet[rng.integers(0, 4, n)].tobytes().decode() for n in lengths]
    df = pd.DataFrame({"record_id": [f"r{i:06d}" for i in range(rows)], "barcode": barcodes,
                       "latitude": rng.uniform(-60, 60, rows).round(4),
                       "longitude": rng.uniform(-170, 170, rows).round(4),
                       "seed": np.full(rows, np.nan)})
    for j, i in enumerate(np.linspace(0, rows - 1, invalid).round().astype(int) if invalid else []):
        kind = j % 4
        if kind == 0:
            df.loc[i, "barcode"] = df.loc[i, "barcode"][:100] + "XZ" + df.loc[i, "barcode"][102:]
        elif kind == 1:
            df.loc[i, "barcode"] = df.loc[i, "barcode"][:120]
        elif kind == 2:
            df.loc[i, "latitude"] = 123.0
        else:
            df.loc[i, "seed"] = -1.0
    df.to_parquet(path)


def predict_cmd(model: str, judge: str | None, table: Path, out: Path, params: Path, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.cli", "predict", "--model", model, "--input", str(table),
           "--output", str(out), "--steps", str(steps), "--params", str(params), "--quiet"]
    return cmd + (["--judge", judge] if judge else [])


def write_params(path: Path, concurrency: int, rows_per_shard: int) -> Path:
    path.write_text(f"predict:\n  concurrency: {concurrency}\n  rows_per_shard: {rows_per_shard}\n"
                    f"  batch_size: 16\n  num_cpus_per_actor: 1.0\n")
    return path


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = PeakRSS(p.pid)
    out, err = p.communicate()
    driver, worker, private = peak.stop()
    if p.returncode:
        raise RuntimeError(f"predict failed ({p.returncode}):\n{err[-4000:]}")
    summary = json.loads(out)
    summary.update(wall_s=round(time.perf_counter() - t0, 1), driver_peak_gb=round(driver, 3),
                   worker_peak_gb=round(worker, 3), worker_private_peak_gb=round(private, 3),
                   largest_process=peak.worker_name)
    return summary


def throughput(model: str, judge: str | None, work: Path, rows: int, steps: int, env: dict[str, str]) -> list[dict]:
    table = work / "throughput.parquet"
    make_table(table, rows, 0, seed=1)
    out = []
    for actors in (1, 2):
        params = write_params(work / f"actors{actors}.yaml", actors, max(8, rows // 16))
        s = run_measured(predict_cmd(model, judge, table, work / f"tp{actors}", params, steps), env)
        row = {"part": "throughput", "actors": actors, "images": s["images"], "wall_s": s["wall_s"],
               "images_per_s": s["images_per_s"], "images_per_busy_s": s["images_per_busy_s"]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def memory(model: str, judge: str | None, work: Path, sizes: list[int], steps: int,
           env: dict[str, str]) -> list[dict]:
    out = []
    params = write_params(work / "memory.yaml", 0, 256)
    for n in sizes:
        table = work / f"table{n}.parquet"
        make_table(table, n, 20 if n >= 10_000 else 0)
        s = run_measured(predict_cmd(model, judge, table, work / f"mem{n}", params, steps), env)
        row = {"part": "memory", "rows": n, "records": s["records"], "errors": s["errors"], "wall_s": s["wall_s"],
               "driver_peak_gb": s["driver_peak_gb"], "worker_peak_gb": s["worker_peak_gb"],
               "worker_private_peak_gb": s["worker_private_peak_gb"], "largest_process": s["largest_process"]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def resume(model: str, judge: str | None, work: Path, rows: int, steps: int, env: dict[str, str]) -> dict:
    table = work / f"table{rows}.parquet"
    if not table.exists():
        make_table(table, rows, 20)
    params = write_params(work / "resume.yaml", 0, 256)
    out = work / "resume"
    cmd = predict_cmd(model, judge, table, out, params, steps)
    shards = -(-rows // 256)
    t0 = time.perf_counter()
    # Ctrl-C's signal, to the whole group; restored to its default first, since a shell starts background
    # jobs with SIGINT ignored and children inherit that
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while len(list(out.glob("part-*.parquet"))) < shards // 2 and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    first = time.perf_counter() - t0
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    s = run_measured(cmd, env)
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    row = {"part": "resume", "rows": rows, "shards": s["shards"], "written_before_interrupt": len(before),
           "first_run_s": round(first, 1), "rerun_skipped": s["shards_skipped"], "rerun_written": s["shards_written"],
           "rerun_wall_s": s["wall_s"], "untouched": all(after[k] == v for k, v in before.items()),
           "records": s["records"], "errors": s["errors"]}
    print(json.dumps(row), flush=True)
    return row


def projection(model: str, paper: bool) -> list[dict]:
    from benchmarks.flops import image_flops, paper_pipeline, projected_seconds, scaled_to_steps
    from g2p.pipeline import load_pipeline

    out = []
    pipes = [("this model", lambda: load_pipeline(model))]
    if paper:
        pipes.append(("paper preset, 256 px", paper_pipeline))
    for name, build in pipes:
        pipe = build()
        s = pipe.cfg.sampling
        measured = min(s.steps, 2)
        flops = scaled_to_steps(pipe, image_flops(pipe, measured, s.guidance_scale, s.aligner_guidance_scale),
                                measured, s.steps)
        row = {"part": "projection", "model": name, "image_px": int(pipe.vae.config.sample_size),
               "scheduler": s.scheduler, "steps": s.steps, "guidance_scale": s.guidance_scale,
               "aligner_guidance_scale": s.aligner_guidance_scale,
               **{f"gflop_{k}": round(v / 1e9, 2) for k, v in flops.items()},
               "full_tables_images": FULL_TABLE_IMAGES, "assumed_peak_flops": H100_BF16_PEAK,
               "assumed_mfu": ASSUMED_MFU}
        for gpus in (1, 8, 64):
            row[f"hours_on_{gpus}_gpus"] = round(projected_seconds(flops["total"], FULL_TABLE_IMAGES, gpus,
                                                                   H100_BF16_PEAK, ASSUMED_MFU) / 3600, 2)
        print(json.dumps(row), flush=True)
        out.append(row)
        del pipe
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks inference", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/g2pdiffusion")
    ap.add_argument("--judge", default="models/judge", help="scores in the output ('' for none)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps of the prediction runs")
    ap.add_argument("--throughput-rows", type=int, default=600)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    ap.add_argument("--parts", nargs="+", default=["throughput", "memory", "resume", "projection"],
                    choices=["throughput", "memory", "resume", "projection"])
    ap.add_argument("--no-paper", action="store_true", help="skip the paper preset's FLOPs (53 s, 9 GB to build)")
    ap.add_argument("--quick", action="store_true", help="small sizes, no paper preset: a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.throughput_rows, a.sizes, a.no_paper = 64, [100, 400], True
    if not Path(a.model).exists():
        print(f"inference: no model at {a.model} (run `make run`, or pass --model)", file=sys.stderr)
        return 2
    judge = a.judge if a.judge and Path(a.judge).exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        if "throughput" in a.parts:
            results["throughput"] = throughput(a.model, judge, work, a.throughput_rows, a.steps, env)
        if "memory" in a.parts:
            results["memory"] = memory(a.model, judge, work, a.sizes, a.steps, env)
        if "resume" in a.parts:
            results["resume"] = [resume(a.model, judge, work, max(a.sizes), a.steps, env)]
    if "projection" in a.parts:
        results["projection"] = projection(a.model, not a.no_paper)
    print("\nsummary")
    tp = results.get("throughput")
    if tp:
        print(f"  2 actors / 1 actor: wall {tp[1]['images_per_s'] / tp[0]['images_per_s']:.2f}x, "
              f"busy {tp[1]['images_per_busy_s'] / tp[0]['images_per_busy_s']:.2f}x "
              f"({tp[0]['images_per_busy_s']} -> {tp[1]['images_per_busy_s']} images/s)")
    mem = results.get("memory")
    if mem and len(mem) > 1:
        lo, hi = mem[0], mem[-1]
        for key in ("driver_peak_gb", "worker_peak_gb", "worker_private_peak_gb"):
            print(f"  {key}: {lo[key]} GB at {lo['rows']} rows, {hi[key]} GB at {hi['rows']}: "
                  f"x{hi[key] / max(lo[key], 1e-9):.2f}")
    for row in results.get("projection", []):
        print(f"  {row['model']}: {row['gflop_total']} GFLOP/image ({row['scheduler']} {row['steps']} steps); "
              f"full tables ({FULL_TABLE_IMAGES:,} images) at MFU {ASSUMED_MFU} of {H100_BF16_PEAK:.3g} FLOP/s: "
              f"{row['hours_on_1_gpus']} h on 1 GPU, {row['hours_on_8_gpus']} h on 8, "
              f"{row['hours_on_64_gpus']} h on 64")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
