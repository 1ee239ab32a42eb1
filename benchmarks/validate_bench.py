"""Speed benchmark of ``g2p data validate`` at BIOSCAN-5M's size (5.15 million records).

Why a separate script: the validation stage must keep up with the real
dataset on a 2-core machine (issue 12's goal, with ``prepare``: the pretrain
split at BIOSCAN-5M size in under 15 minutes and 4 GB peak RSS; images not
checked here). The metadata table is generated here with numpy straight into
Arrow buffers (no Python string per record), so making it takes seconds and
the benchmark does not depend on the synthetic image generator.

The validation runs in a fresh child process so its peak RSS is its own, not
the generator's. Measured on the project's 2-core box, nothing else running
(load < 1), with the one-pass stage that held the whole table: 26.8 and
28.7 s wall (about 41 s CPU over both cores), peak RSS 6.8-7.0 GB. The
stage now streams (ids first, then block by block, writing as it goes);
old and new back to back on the same 5.15 M rows, with other sessions
training on the box (load 8-10): old 254 s wall, 111 s CPU, 6.96 GB peak;
new 178 s wall, 107 s CPU, 2.46 GB peak, identical valid/quarantine
contents (2.7% of records quarantined). This script under load ~20: 346 s
wall, 120 s CPU, 2.79 GB. Where the new peak sits (RSS sampled per phase):
reading the ids 1.5 GB, their dictionary codes 2.2 GB, the streamed pass
2.3 GB, GX 2.45 GB; about 0.4 GB of it is the imports. CPU time on this
shared box grows with its load, so compare runs made side by side.
The table is pessimistic: a quarter of its reads are longer than
660 nt and need a trim (few of the real ones do). Usage::

    .venv/bin/python benchmarks/validate_bench.py               # 5.15M rows
    .venv/bin/python benchmarks/validate_bench.py --rows 200000 # quick look
    .venv/bin/python benchmarks/validate_bench.py --root /tmp/bench5m  # keep the CSV, rerun fast
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2p.data.layout import COLUMNS, METADATA_RELPATH, SPLITS  # noqa: E402

BIOSCAN_5M_ROWS = 5_150_850
_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
# Split shares of BIOSCAN-5M (pretrain dominates).
_SPLIT_P = np.array([4_677_756, 289_203, 14_757, 39_373, 36_465, 8_819, 7_887, 76_590], dtype=np.float64)


def _barcodes(rng: np.random.Generator, pool: np.ndarray, pool_len: np.ndarray, n: int) -> tuple[pa.Array, np.ndarray]:
    """n barcodes as one Arrow string array: a pool entry each, with ~1% point mutations."""
    pick = rng.integers(0, len(pool), n)
    lengths = pool_len[pick]
    mat = pool[pick]  # (n, Lmax) uint8
    mut = rng.random(mat.shape) < 0.01
    mat[mut] = _BASES[rng.integers(0, 4, int(mut.sum()))]
    data = mat[np.arange(mat.shape[1])[None, :] < lengths[:, None]]  # row-major: rows stay in order
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    arr = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))
    return arr, pick


def _corrupt(rng: np.random.Generator, barcodes: list[str | None], lat: list[str | None], lon: list[str | None],
             split: list[str], pids: list[str], bad_share: float) -> None:
    """Flip a few % of records to each kind of bad value (and some harmless ones), in place."""
    n = len(barcodes)
    kinds = ("alphabet", "short", "many_n", "lat_range", "lon_range", "lat_only", "non_numeric",
             "duplicate", "split", "no_place", "lower_gaps")
    rows = rng.choice(n, size=int(n * bad_share), replace=False)
    for i, k in zip(rows.tolist(), rng.integers(0, len(kinds), len(rows)).tolist()):
        kind, b = kinds[k], barcodes[i] or ""
        if kind == "alphabet":
            barcodes[i] = b[:100] + "X1" + b[102:]
        elif kind == "short":
            barcodes[i] = b[:150]
        elif kind == "many_n":
            barcodes[i] = "N" * 200 + b[200:]
        elif kind == "lat_range":
            lat[i] = "95.5"
        elif kind == "lon_range":
            lon[i] = "-200.0"
        elif kind == "lat_only":
            lon[i] = None
        elif kind == "non_numeric":
            lat[i] = "north"
        elif kind == "duplicate":
            pids[i] = pids[(i + 1) % n]
        elif kind == "split":
            split[i] = "training"
        elif kind == "no_place":  # valid: the "unknown place" token
            lat[i] = lon[i] = None
        else:  # valid after normalisation
            barcodes[i] = b[:50].lower() + "--" + b[50:]


def write_table(path: Path, rows: int, seed: int = 0, chunk: int = 250_000, bad_share: float = 0.03) -> None:
    """Write a BIOSCAN-5M-shaped metadata CSV of ``rows`` records, chunk by chunk (low memory)."""
    rng = np.random.default_rng(seed)
    pool_n, lmax = 2000, 680
    pool = _BASES[rng.integers(0, 4, (pool_n, lmax))]
    pool_len = rng.integers(600, lmax + 1, pool_n)
    split_p = _SPLIT_P / _SPLIT_P.sum()
    species = np.array([f"Species {i}" for i in range(pool_n)], dtype=object)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        bc, pick = _barcodes(rng, pool, pool_len, n)
        split = np.array(SPLITS, dtype=object)[rng.choice(len(SPLITS), n, p=split_p)]
        pids = [f"BSC{start + i:08d}-24" for i in range(n)]
        lat = np.round(rng.uniform(-60, 70, n), 3).astype(str).tolist()
        lon = np.round(rng.uniform(-180, 180, n), 3).astype(str).tolist()
        bcl, spl = bc.to_pylist() if bad_share else None, split.tolist()
        if bad_share:
            _corrupt(rng, bcl, lat, lon, spl, pids, bad_share)
            bc = pa.array(bcl, pa.string())
        labelled = np.isin(np.array(spl, dtype=object), ["pretrain", "training"], invert=True)
        sp = np.where(labelled, species[pick], None)
        cols = {
            "processid": pa.array(pids), "sampleid": pa.array([p.replace("BSC", "SMP") for p in pids]),
            "taxon": pa.array(np.where(labelled, sp, "Insecta")), "phylum": pa.array(["Arthropoda"] * n),
            "class": pa.array(["Insecta"] * n), "order": pa.array(["Diptera"] * n),
            "family": pa.array(["Phoridae"] * n), "subfamily": pa.nulls(n, pa.string()),
            "genus": pa.array(np.where(labelled, "Megaselia", None)), "species": pa.array(sp),
            "dna_bin": pa.array([f"BOLD:A{p:05d}" for p in pick.tolist()]), "dna_barcode": bc,
            "country": pa.array(["Canada"] * n), "province_state": pa.array(["Ontario"] * n),
            "coord-lat": pa.array(lat, pa.string()), "coord-lon": pa.array(lon, pa.string()),
            "image_measurement_value": pa.array(rng.integers(1000, 20000, n)),
            "area_fraction": pa.array(np.round(rng.random(n), 4)),
            "scale_factor": pa.array(np.round(rng.random(n), 4)),
            "inferred_ranks": pa.array(np.zeros(n, dtype=np.uint8)), "split": pa.array(spl),
            "index_bioscan_1M_insect": pa.nulls(n, pa.int64()), "chunk": pa.nulls(n, pa.string()),
        }
        table = pa.table({c: cols[c] for c in COLUMNS})
        if writer is None:
            # Unquoted, like the official pandas-written file (no value here holds a comma).
            writer = pacsv.CSVWriter(str(path), table.schema, write_options=pacsv.WriteOptions(quoting_style="none"))
        writer.write_table(table)
    if writer is not None:
        writer.close()


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_validation(root: Path, out: Path) -> dict:
    """The measured part, in this (fresh) process: validate_root with images off."""
    t0 = time.perf_counter()
    from g2p.config import ValidateConfig
    from pipelines.validation import ValidationFailed, validate_root

    t_import = time.perf_counter() - t0
    cfg = ValidateConfig(check_images=False, max_reject_fraction=1.0)
    t1, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        summary = validate_root(root, out, cfg, progress=False)
    except ValidationFailed as e:  # threshold is 1.0 here; kept for completeness
        summary = json.loads((out / "summary.json").read_text())
        print(f"(validation failed: {e})")
    wall = time.perf_counter() - t1
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "rows": summary["records_in"], "valid": summary["valid"], "quarantined": summary["quarantined"],
        "import_s": round(t_import, 2), "validate_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "rows_per_s": round(summary["records_in"] / wall), "phases_s": summary.get("timings_s", {}),
        "peak_rss_gb": round(_peak_rss_gb(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help=f"records (default {BIOSCAN_5M_ROWS:,})")
    p.add_argument("--quick", action="store_true", help="200,000 records: a smoke run, not figures to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the temporary root (default: system temp)")
    p.add_argument("--root", default=None, help="generate into (or reuse) this root and keep it")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # internal: root to validate
    args = p.parse_args(argv)
    args.rows = args.rows or (200_000 if args.quick else BIOSCAN_5M_ROWS)
    if args._child:
        root = Path(args._child)
        res = run_validation(root, root / "validation")
        print(json.dumps(res, indent=2))
        print(f"{res['rows']:,} rows validated in {res['validate_s']} s wall ({res['cpu_s']} s CPU, "
              f"{res['rows_per_s']:,} rows/s), peak RSS {res['peak_rss_gb']} GB")
        return 0
    if args.root:  # reuse a generated root (kept between runs)
        root = Path(args.root)
        if not (root / METADATA_RELPATH).is_file():
            _generate(root, args.rows, args.seed)
        return subprocess.call([sys.executable, __file__, "--_child", str(root)])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        _generate(Path(tmp), args.rows, args.seed)
        return subprocess.call([sys.executable, __file__, "--_child", tmp])


def _generate(root: Path, rows: int, seed: int) -> None:
    t = time.perf_counter()
    write_table(root / METADATA_RELPATH, rows, seed)
    size = (root / METADATA_RELPATH).stat().st_size / 1e9
    print(f"generated {rows:,} rows ({size:.2f} GB CSV) in {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
