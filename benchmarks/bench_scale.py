"""Scale: validate, prepare, latent encoding and 100 streamed train_diffusion steps at 20 k and 200 k records.

    python -m benchmarks scale                      # 20 k and 200 k records
    python benchmarks/bench_scale.py --sizes 20000  # one size
    python benchmarks/bench_scale.py --sizes 20000 200000 --phases validate prepare --work W  # some phases
    python benchmarks/bench_scale.py --quick        # 2 k records, 20 steps (a smoke run)
    python benchmarks/bench_scale.py --workers-only # 1 vs 2 Ray workers on the streamed ingest
    python benchmarks/bench_scale.py --pretrain     # BIOSCAN-5M's pretrain split (5.14 M barcodes)

A synthetic root in the BIOSCAN-5M layout is grown from a small synthesised
one (256 px JPEGs): its metadata rows are repeated with new processids and
every record gets its own image *file*, a hard link to one of the pool's
images, so every record is opened and decoded on its own while the disk holds
only the pool. Then each phase runs as its own process (so its peak memory is
its own): ``g2p data validate`` (images checked), ``pipelines.prepare``,
``pipelines.latents`` (the default preset's VAE, or ``--preset tiny``'s for a
run in minutes: its speed, not its quality, matters here) and 100 steps of
``train_diffusion`` streamed from the latents on 2 Ray workers. For each:
wall time, records/s, the peak resident memory of the driver and of the
largest other process of its tree (a Ray worker), sampled every 0.2 s. The
figures to read are the ratios between the sizes: peak memory at 200 k within
1.25x of 20 k, time per record within 1.3x.

``--pretrain``: the metadata of ``g2p data synth --preset large`` (BIOSCAN-5M's
5.15 M rows, no images) through ``g2p data validate`` (no image check: the
root has none) and ``pipelines.prepare`` of its ``pretrain`` split (the
records with images are dropped from ``valid.parquet`` first, by a streamed
filter that is not timed), the goal being under 15 minutes and 4 GB peak on
2 cores for the two phases together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def grow_root(pool: Path, out: Path, n: int) -> None:
    """``out``: ``n`` records (metadata of ``pool`` repeated, new processids), one hard-linked image each."""
    import pandas as pd

    from g2p.data.layout import COLUMN_DTYPES, METADATA_RELPATH, image_relpath

    src = pd.read_csv(pool / METADATA_RELPATH, dtype=COLUMN_DTYPES)
    src = src[src["split"] != "pretrain"].reset_index(drop=True)  # records with images
    reps = -(-n // len(src))
    df = pd.concat([src] * reps, ignore_index=True).iloc[:n].copy()
    orig = df["processid"].to_numpy()
    df["processid"] = [f"SCL{i:07d}-24" for i in range(n)]
    df["sampleid"] = [f"SCALE-{i:07d}" for i in range(n)]
    df["chunk"] = ""
    (out / METADATA_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / METADATA_RELPATH, index=False)
    made: set[Path] = set()
    for pid, old, split, chunk in zip(df["processid"], orig, df["split"], src["chunk"].to_numpy()[
            [i % len(src) for i in range(n)]]):
        dest = out / image_relpath(pid, split, None)
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        c = None if pd.isna(chunk) or chunk == "" else str(chunk)
        os.link(pool / image_relpath(old, split, c), dest)


class PeakRSS:
    """Peak RSS of a process and of the largest process among its descendants, sampled; and the
    largest descendant's peak private memory (RSS less its shared pages: a Ray worker's RSS also
    counts the object store's shared-memory pages it has mapped, which belong to the store)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        import psutil

        self.proc, self.every = psutil.Process(pid), every
        self.driver = self.worker = self.private = 0
        self.worker_name = ""  # the process name of the largest descendant (a Ray worker, raylet, GCS...)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.proc.memory_info().rss)
                for c in self.proc.children(recursive=True):
                    try:
                        m = c.memory_info()
                        if m.rss > self.worker:
                            self.worker, self.worker_name = m.rss, c.name()
                        self.private = max(self.private, m.rss - m.shared)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(self.every)

    def stop(self) -> tuple[float, float, float]:
        self._stop.set()
        self._t.join()
        return self.driver / 2**30, self.worker / 2**30, self.private / 2**30


def phase(name: str, cmd: list[str], cwd: Path, env: dict[str, str], records: int) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = PeakRSS(p.pid)
    out, _ = p.communicate()
    wall = time.perf_counter() - t0
    driver, worker, private = peak.stop()
    if p.returncode:
        raise RuntimeError(f"{name} failed ({p.returncode}):\n{out[-4000:]}")
    row = {"phase": name, "records": records, "wall_s": round(wall, 1), "records_per_s": round(records / wall, 1),
           "ms_per_record": round(1000 * wall / records, 3), "driver_peak_gb": round(driver, 2),
           "worker_peak_gb": round(worker, 2), "worker_private_peak_gb": round(private, 2),
           "largest_process": peak.worker_name}
    print(json.dumps(row), flush=True)
    return row


def params_for(work: Path, steps: int, workers: int, preset: str = "default",
               object_store_gb: float | None = None) -> Path:
    raw = yaml.safe_load(subprocess.run([str(BIN / "g2p"), "config", "dump", "--preset", preset],
                                        capture_output=True, text=True, check=True).stdout)
    raw["validate"]["max_reject_fraction"] = 1.0  # the grown root repeats barcodes; measure, do not gate
    raw["train_diffusion"].update(steps=steps, log_every=10, checkpoint_every=steps)
    raw["ray"].update(num_workers=workers, storage_path=str(work / "ray"), object_store_gb=object_store_gb)
    path = work / f"params-{preset}-{workers}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tagged(work: Path, name: str, preset: str) -> Path:
    """``work / name``, suffixed with the preset where it is not the default: ``prep20000-tiny``."""
    return work / (name if preset == "default" else f"{name}-{preset}")


def model_dir(work: Path, preset: str) -> Path:
    """The freshly initialised model of ``preset`` the latent and training phases use (made once)."""
    path = tagged(work, "model", preset)
    if not path.exists():
        subprocess.run([sys.executable, "-c", "from g2p.config import preset; from g2p.model import G2PDiffusion; "
                        f"G2PDiffusion(preset({preset!r})).save_pretrained({str(path)!r})"], check=True)
    return path


PHASES = ("validate", "prepare", "encode_latents", "train_diffusion")


def run_size(pool: Path, work: Path, n: int, steps: int, env: dict[str, str],
             phases: tuple[str, ...] = PHASES, preset: str = "default",
             object_store_gb: float | None = None) -> list[dict]:
    """The chosen ``phases`` at ``n`` records, in order; a phase reads the previous one's output from
    ``work`` (so ``--phases encode_latents`` reuses an earlier run's ``prep<n>``). Outputs of another
    ``preset`` than ``default`` (its image size, VAE and UNet) carry its name: ``prep<n>-tiny``."""
    root = work / f"root{n}"
    grown = False
    if {"validate", "prepare"} & set(phases) and not root.exists():
        t0 = time.perf_counter()
        grow_root(pool, root, n)
        grown = True
        print(f"scale: grew a {n}-record root in {time.perf_counter() - t0:.0f} s", flush=True)
    params = params_for(work, steps, 2, preset, object_store_gb)
    py = [sys.executable, "-m"]
    model = model_dir(work, preset)
    rows = []
    val, prep, lat, out = (tagged(work, f"{name}{n}", preset) for name in ("val", "prep", "lat", "out"))
    if "validate" in phases:
        rows.append(phase("validate", [str(BIN / "g2p"), "data", "validate", "--root", str(root), "--out",
                                       str(val), "--params", str(params), "--quiet"], work, env, n))
    if "prepare" in phases:
        rows.append(phase("prepare", py + ["pipelines.prepare", "--valid", str(val / "valid.parquet"), "--root",
                                           str(root), "--out", str(prep), "--params", str(params), "--quiet"],
                          work, env, n))
    if "encode_latents" in phases:
        train_rows = json.loads((prep / "train" / "manifest.json").read_text())["rows"]
        rows.append(phase("encode_latents", py + ["pipelines.latents", "--model", str(model), "--prepared",
                                                  str(prep), "--out", str(lat), "--params", str(params), "--quiet"],
                          work, env, train_rows))
    if "train_diffusion" in phases:
        train_rows = json.loads((lat / "train" / "manifest.json").read_text())["rows"]
        run = tagged(work, f"diff{n}", preset).name
        rows.append(phase(f"train_diffusion_{steps}_steps", py + [
            "pipelines.ray_train", "--stage", "train_diffusion", "--data", str(lat / "train"),
            "--init-model", str(model), "--params", str(params), "--run-name", run, "--out",
            str(out)], work, env, train_rows))
        log = [json.loads(x) for x in (work / "ray" / run / "metrics.jsonl").read_text().splitlines()]
        rates = [r["global_samples_per_s"] for r in log if r.get("event") == "step"][1:]
        rows[-1]["steady_samples_per_s"] = round(sorted(rates)[len(rates) // 2], 1) if rates else None
    if grown:
        import shutil

        shutil.rmtree(root)  # the links; the pool stays
    return rows


def workers_compare(work: Path, n: int, steps: int, env: dict[str, str], preset: str = "default",
                    object_store_gb: float | None = None) -> list[dict]:
    """1 vs 2 Ray workers streaming the same latents, alternated twice; median steady samples/s each."""
    out = []
    for rep in range(2):
        for w in (1, 2):
            params = params_for(work, steps, w, preset, object_store_gb)
            name = tagged(work, f"w{w}-{rep}", preset).name
            phase(f"train_diffusion_{w}_workers", [sys.executable, "-m", "pipelines.ray_train", "--stage",
                                                   "train_diffusion", "--data", str(tagged(work, f"lat{n}", preset)
                                                                                    / "train"),
                                                   "--init-model", str(model_dir(work, preset)), "--params",
                                                   str(params), "--run-name", name, "--out", str(work / name)],
                  work, env, 1)
            log = [json.loads(x) for x in (work / "ray" / name / "metrics.jsonl").read_text().splitlines()]
            rates = sorted(r["global_samples_per_s"] for r in log if r.get("event") == "step")[1:]
            out.append({"workers": w, "rep": rep, "samples_per_s": round(rates[len(rates) // 2], 1)})
            print(json.dumps(out[-1]), flush=True)
    for w in (1, 2):
        print(f"scale: {w} worker(s): best {max(r['samples_per_s'] for r in out if r['workers'] == w)} samples/s")
    return out


def pretrain_only(valid: Path, out: Path) -> int:
    """``valid`` restricted to the ``pretrain`` split, streamed batch by batch into ``out``; its row count."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    ds = pads.dataset(valid)
    writer, n = None, 0
    try:
        for batch in ds.to_batches(filter=pads.field("split") == "pretrain", batch_size=200_000):
            if writer is None:
                writer = pq.ParquetWriter(out, batch.schema)
            writer.write_batch(batch)
            n += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return n


def run_pretrain(work: Path, env: dict[str, str], object_store_gb: float | None = None) -> list[dict]:
    """validate + prepare of BIOSCAN-5M's pretrain split (metadata of ``--preset large``), each in its own process."""
    root = work / "large"
    if not (root / "bioscan5m").exists():
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "g2p"), "data", "synth", "--preset", "large", "--out", str(root), "--quiet"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"scale: synthesised the large (metadata-only) root in {time.perf_counter() - t0:.0f} s", flush=True)
    raw = yaml.safe_load(subprocess.run([str(BIN / "g2p"), "config", "dump", "--preset", "default"],
                                        capture_output=True, text=True, check=True).stdout)
    raw["validate"].update(check_images=False, max_reject_fraction=1.0)  # no images in a metadata-only root
    raw["ray"].update(storage_path=str(work / "ray"), object_store_gb=object_store_gb)
    params = work / "params-pretrain.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    import pyarrow.parquet as pq
    from g2p.data.layout import METADATA_RELPATH

    rows = sum(1 for _ in open(root / METADATA_RELPATH)) - 1
    out = [phase("validate (5.15 M rows, no images)", [str(BIN / "g2p"), "data", "validate", "--root", str(root),
                                                       "--out", str(work / "val_large"), "--params", str(params),
                                                       "--quiet"], work, env, rows)]
    n = pretrain_only(work / "val_large" / "valid.parquet", work / "valid_pretrain.parquet")
    assert n == pq.ParquetFile(work / "valid_pretrain.parquet").metadata.num_rows
    out.append(phase("prepare (pretrain split)", [sys.executable, "-m", "pipelines.prepare", "--valid",
                                                  str(work / "valid_pretrain.parquet"), "--root", str(root), "--out",
                                                  str(work / "prep_large"), "--params", str(params), "--quiet"],
                     work, env, n))
    total = sum(r["wall_s"] for r in out)
    peak = max(max(r["driver_peak_gb"], r["worker_peak_gb"]) for r in out)
    print(f"scale: pretrain split ({n} valid of {rows} rows): validate + prepare {total:.0f} s "
          f"({total / 60:.1f} min, goal < 15), peak process {peak:.2f} GB (goal < 4)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="2 k records, 20 steps")
    p.add_argument("--workers-only", action="store_true", help="only 1 vs 2 workers (on the smallest size)")
    p.add_argument("--pretrain", action="store_true", help="only BIOSCAN-5M's pretrain split: validate + prepare")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                   help="phases to run at each size (a later phase reuses an earlier run's outputs in --work)")
    p.add_argument("--preset", default="default", choices=("tiny", "default"),
                   help="the model preset of every phase (image size, VAE, UNet): tiny measures the data path "
                        "at 200 k records in minutes rather than the hour the default VAE takes on 2 cores")
    p.add_argument("--object-store-gb", type=float, default=None,
                   help="ray.object_store_gb of every phase's local Ray (default: Ray's, 30%% of memory)")
    a = p.parse_args(argv)
    sizes, steps = ([2000], 20) if a.quick else (a.sizes, a.steps)
    work = Path(a.work or tempfile.mkdtemp(prefix="g2p-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    pool = work / "pool"
    if not a.pretrain and not pool.exists():
        raw = yaml.safe_load(subprocess.run([str(BIN / "g2p"), "config", "dump", "--preset", "tiny"],
                                            capture_output=True, text=True, check=True).stdout)
        raw["data"]["image_size"] = 256  # the images BIOSCAN-5M's cropped_256 folder holds
        (work / "pool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        subprocess.run([str(BIN / "g2p"), "data", "synth", "--out", str(pool), "--params", str(work / "pool.yaml"),
                        "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)
    results: dict = {"sizes": {}}
    if a.pretrain:
        results["pretrain"] = run_pretrain(work, env, a.object_store_gb)
    elif not a.workers_only:
        for n in sizes:
            results["sizes"][n] = run_size(pool, work, n, steps, env, tuple(a.phases), a.preset, a.object_store_gb)
        if len(sizes) >= 2:
            lo, hi = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
            for a_, b_ in zip(lo, hi):
                peak = max(b_["driver_peak_gb"], b_["worker_peak_gb"]) / max(1e-9, max(a_["driver_peak_gb"],
                                                                                        a_["worker_peak_gb"]))
                private = max(b_["driver_peak_gb"], b_["worker_private_peak_gb"]) / max(
                    1e-9, max(a_["driver_peak_gb"], a_["worker_private_peak_gb"]))
                print(f"scale: {a_['phase']}: {sizes[-1]} vs {sizes[0]} records: peak memory x{peak:.2f} "
                      f"(private, without the object store's pages: x{private:.2f}), "
                      f"time per record x{b_['ms_per_record'] / max(1e-9, a_['ms_per_record']):.2f}")
    else:
        n = sizes[0]
        if not (tagged(work, f"lat{n}", a.preset) / "train" / "manifest.json").exists():  # made if missing
            have_prep = (tagged(work, f"prep{n}", a.preset) / "train").exists()
            run_size(pool, work, n, steps, env, ("encode_latents",) if have_prep
                     else ("validate", "prepare", "encode_latents"), a.preset, a.object_store_gb)
        results["workers"] = workers_compare(work, sizes[0], steps, env, a.preset, a.object_store_gb)
    (work / "scale.json").write_text(json.dumps(results, indent=2))
    print(f"scale: results in {work / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
