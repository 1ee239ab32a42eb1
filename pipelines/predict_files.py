"""The files of a batch prediction at its output location (a path or URI): the staged input, the parts.

    <output>/_predict.json                 the request (pipelines/predict.py)
    <output>/_input/part-NNNNNN.parquet    the input, in shards of rows_per_shard rows, and _staged.json
    <output>/part-NNNNNN.parquet           the output, one file per input shard, written whole or not at all
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

INPUT = "_input"
STAGED = "_staged.json"
PART = re.compile(r"part-(\d{6})\.parquet$")
ADDED = ("sample", "image", "score", "model_version", "steps", "guidance_scale", "aligner_guidance_scale",
         "scheduler", "error")
PART = re.compile(r"part-(\d{6})\.parquet$")


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def write_atomic(fs: Any, path: str, table: pa.Table) -> None:
    """A local file is written aside and renamed; an object store's PUT is atomic already."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        head, _, name = path.rpartition("/")
        tmp = f"{head}/.{name}.tmp-{os.getpid()}"  # hidden: readers of the folder skip it
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def input_files(location: str) -> tuple[Any, list[str], str]:
    """(file system, files in order, "parquet" or "csv")."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input: {location!r} does not exist")
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        if not files:
            raise ValueError(f"input: folder {location!r} holds no .parquet files")
        return fs, files, "parquet"
    name = path.lower()
    if name.endswith(".parquet"):
        return fs, [path], "parquet"
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        return fs, [path], "csv"
    raise ValueError(f"input: {location!r} is neither Parquet (.parquet, a folder of them) nor CSV (.csv, .csv.gz)")


def _batches(fs: Any, files: list[str], kind: str):
    if kind == "csv":
        from pipelines.metadata_csv import text_csv_batches

        yield from text_csv_batches(lambda: fs.open_input_stream(files[0]))
        return
    for f in files:
        pf = pq.ParquetFile(fs.open_input_file(f))
        yield from pf.iter_batches(batch_size=8192)


def fingerprint(fs: Any, files: list[str]) -> list[list[Any]]:
    return [[f, i.size, i.mtime_ns] for f, i in zip(files, fs.get_file_info(files))]


def stage_input(location: str, out: str, rows_per_shard: int, columns: dict[str, str],
                progress: bool = True) -> dict[str, Any]:
    """Stream the input into ``<out>/_input/part-NNNNNN.parquet`` of ``rows_per_shard`` rows each; the
    staging record (rows, shards, schema), reused when the same input was staged before."""
    fs, files, kind = input_files(location)
    ofs, obase = storage.filesystem(out)
    fp = fingerprint(fs, files)
    staged = read_json(ofs, f"{obase}/{INPUT}/{STAGED}")
    if staged is not None and staged["fingerprint"] == fp and staged["rows_per_shard"] == rows_per_shard:
        return staged
    ofs.create_dir(f"{obase}/{INPUT}", recursive=True)
    rows, shard, pending, schema = 0, 0, [], None
    t0 = time.perf_counter()

    def flush(tables: list[pa.Table]) -> None:
        nonlocal shard
        pq.write_table(pa.concat_tables(tables), f"{obase}/{INPUT}/{part_name(shard)}", filesystem=ofs)
        shard += 1

    held = 0
    for b in _batches(fs, files, kind):
        if schema is None:
            schema = b.schema
            missing = [role for role in ("barcode",) if columns[role] not in schema.names]
            if missing:
                raise ValueError(f"input: no column {columns['barcode']!r} for the barcode "
                                 f"(columns: {schema.names}; map one with --column barcode=NAME)")
            clash = [c for c in ADDED if c in schema.names]
            if clash:
                raise ValueError(f"input: column {clash[0]!r} would be overwritten by the output's; rename it")
        t = pa.Table.from_batches([b]).cast(schema)
        while t.num_rows:
            take = min(rows_per_shard - held, t.num_rows)
            pending.append(t.slice(0, take))
            held += take
            rows += take
            t = t.slice(take)
            if held == rows_per_shard:
                flush(pending)
                pending, held = [], 0
        if progress:
            print(f"predict: staged {rows:,} rows ({rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s)",
                  file=sys.stderr, flush=True)
    if pending:
        flush(pending)
    if rows == 0:
        raise ValueError(f"input: {location!r} has no rows")
    staged = {"fingerprint": fp, "rows": rows, "shards": shard, "rows_per_shard": rows_per_shard,
              "columns": schema.names}
    write_json(ofs, f"{obase}/{INPUT}/{STAGED}", staged)
    return staged


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_json(fs: Any, path: str, obj: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def written_shards(out: str) -> set[int]:
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(out)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return {int(m.group(1)) for i in infos if (m := PART.search(i.path)) and i.type == pafs.FileType.File}


def count_errors(out: str, num_shards: int) -> int:
    """Rows with an error over every output file (read one ``error`` column at a time)."""
    fs, base = storage.filesystem(out)
    total = 0
    for i in range(num_shards):
        col = pq.read_table(f"{base}/{part_name(i)}", columns=["error"], filesystem=fs).column("error")
        total += len(col) - col.null_count
    return total
