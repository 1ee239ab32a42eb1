"""DVC stage ``prepare``: validated records -> sharded Parquet datasets, streamed through Ray Data.

Reads ``valid.parquet`` (the records ``validate`` let through) as a Ray
dataset in blocks sized from the data (:func:`pipelines.shards.num_blocks`:
about 8 MB each, at least two per CPU of the cluster), decodes and resizes
the images of the image splits to ``vae.image_size`` in ``map_batches``
tasks spread over the cluster, and writes each split group as a sharded
dataset (:mod:`pipelines.shards`: Parquet files of about 32 MB, metadata as
columns, images as raw uint8 bytes). No process ever holds a whole split:
blocks stream from the reader through the decoders into the writers.

Groups:

- ``train``, ``val``, ``test``: records with images;
- ``pretrain``: barcodes and places of the ``pretrain`` + ``train`` records,
  no images (the conditioner's MLM stage reads barcodes only).

Where the files go: beside each group's ``manifest.json`` under ``--out``
(local ``ray.storage_path``, the laptop case), or, when
``ray.storage_path`` is an object-store URI, under
``<storage_path>/prepared/<key>/<group>`` with the manifest under ``--out``
(what DVC tracks), so workers on other nodes read the shards from the store;
``valid.parquet`` is then copied to ``<storage_path>/prepared/_inputs/<key>/``
first, as Ray Data's read tasks run on any node and must not open a path on
the driver's disk.
``--root`` may be a URI too (images in object storage). The rows of a
group are the same for the same inputs; their order inside the files is
Ray Data's (a partitioned write may bundle blocks out of order), so readers
that need an order sort by ``processid`` (:func:`pipelines.shards.load_arrays`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines import shards, storage

IMAGE_GROUPS = {"train": ("train",), "val": ("val",), "test": ("test",)}
BARCODE_GROUPS = {"pretrain": ("pretrain", "train")}
READ_COLUMNS = ["processid", "split", "dna_barcode", "dna_barcode_normalised", "coord-lat", "coord-lon",
                "species", "chunk"]


def _open_image(root: str, relpath: str, size: int) -> np.ndarray:
    from g2p.data.dataset import load_image

    if not storage.is_uri(root):
        return load_image(Path(root) / relpath, size)
    fs, base = storage.filesystem(root)
    with fs.open_input_file(f"{base.rstrip('/')}/{relpath}") as f:
        return load_image(f, size)


GROUPS = {**{g: (s, True) for g, s in IMAGE_GROUPS.items()}, **{g: (s, False) for g, s in BARCODE_GROUPS.items()}}


# What a decode task returns, typed: blocks made from pandas frames would
# type their strings by what each frame holds, and the writer refuses to
# merge blocks that differ ("processid: string vs large_string").
ROW_SCHEMA = pa.schema([("processid", pa.string()), ("species", pa.string()), ("barcode", pa.string()),
                        ("lat", pa.float32()), ("lon", pa.float32()), ("has_place", pa.bool_()),
                        ("image", pa.binary()), ("group", pa.string())])


def _rows(batch: pd.DataFrame, root: str, size: int) -> pa.Table:
    """One Ray Data batch -> its rows of every group (a record may be in two), images decoded at ``size``.

    One pass over ``valid.parquet`` writes every group: the ``group`` column
    becomes the Hive partition of the written files.
    """
    from g2p.data.dataset import records_from_frame
    from g2p.data.layout import image_relpath

    records = records_from_frame(batch)
    parts = []
    for group, (splits, with_images) in GROUPS.items():
        rows = records[records["split"].isin(splits)]
        cols = shards.meta_columns(rows)
        if with_images:
            images = np.empty((len(rows), 3, size, size), dtype=np.uint8)
            for i, (pid, split, chunk) in enumerate(zip(rows["processid"], rows["split"], rows["chunk"])):
                chunk = None if chunk is None or pd.isna(chunk) or chunk == "" else str(chunk)
                images[i] = _open_image(root, image_relpath(str(pid), str(split), chunk), size)
            cols["image"] = shards.pack(images)
        else:
            cols["image"] = np.full(len(rows), None, dtype=object)
        parts.append(pd.DataFrame({**cols, "group": group}))
    return pa.Table.from_pandas(pd.concat(parts, ignore_index=True), schema=ROW_SCHEMA, preserve_index=False)


def bytes_per_input_row(split_counts: dict[str, int], image_size: int) -> int:
    """Bytes written per row of ``valid.parquet``, from what it holds: a decoded image only for the image
    groups' records, the metadata for every group a record lands in (a ``train`` record is in two)."""
    n = sum(split_counts.values())
    written = sum(split_counts.get(s, 0) * shards.row_bytes(image_size if with_images else None)
                  for splits, with_images in GROUPS.values() for s in splits)
    return max(1, -(-written // max(1, n)))


def content_key(valid: str | Path, image_size: int) -> str:
    """What decides the prepared files: the validated records and the resolution."""
    h = hashlib.sha256(f"{image_size}|".encode())
    with open(valid, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _clear(path: str) -> None:
    fs, p = storage.filesystem(path)
    try:
        fs.delete_dir_contents(p, missing_dir_ok=True)
    except OSError as e:
        raise storage.StorageError(f"{path}: storage unreachable ({e})") from None


def prepare(valid: str | Path, root: str | Path, out: str | Path, image_size: int,
            storage_path: str = "outputs/ray", progress: bool = True,
            object_store_gb: float | None = None) -> dict[str, Any]:
    """Write ``out/<group>/`` (a sharded dataset) for every split group; a summary."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    from pipelines.ray_train import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(object_store_gb=object_store_gb)
    shards.data_context(progress=progress, preserve_order=True)  # blocks in input order where Ray Data keeps it
    valid, out = Path(valid), Path(out)
    schema = pq.read_schema(valid)
    columns = [c for c in READ_COLUMNS if c in schema.names]
    split_counts = pd.read_parquet(valid, columns=["split"])["split"].value_counts().to_dict()
    n = int(sum(split_counts.values()))
    cpus = shards.cluster_cpus()
    blocks = shards.num_blocks(n, bytes_per_input_row(split_counts, image_size), cpus)
    key = content_key(valid, image_size)
    # Where the files go: under --out (local storage) or content-keyed in the object store.
    base = storage.join(storage_path, "prepared", key) if shards.remote(storage_path) \
        else storage.resolve(out / "_files")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    _clear(base)
    fs, target = storage.filesystem(base)
    source, source_fs = str(valid.resolve()), None
    if shards.remote(storage_path):  # read tasks run on any node: they read the records from the store too
        source = storage.join(storage_path, "prepared", "_inputs", key, "valid.parquet")
        source_fs, path = storage.filesystem(source)
        try:
            source_fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(valid.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=source_fs)
        except OSError as e:
            raise storage.StorageError(f"{source}: uploading {valid} failed: storage unreachable ({e})") from None
        source = path
    # Ray Data's Parquet reader sizes blocks by the records' bytes (~8 MB of metadata, 10 k records),
    # whatever override_num_blocks asks; a decode task would then make 10 k images (2 GB at 256 px) and
    # a small data set would decode in 2 tasks. Split them, streaming, to the rows `blocks` gives.
    rows_per_block = max(16, -(-n // blocks))
    ds = ray.data.read_parquet(source, filesystem=source_fs, columns=columns, override_num_blocks=blocks)
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    decoded = ds.map_batches(_rows, batch_format="pandas", batch_size=rows_per_block,
                             fn_kwargs={"root": storage.resolve(root), "size": image_size})
    try:
        decoded.write_parquet(target, filesystem=fs, partition_cols=["group"],
                              min_bytes_per_file=shards.TARGET_FILE_BYTES)
    except Exception as e:  # a Ray task's error: name where it was reading and writing
        raise storage.StorageError(f"{base}: writing the prepared shards (images under {root}) failed: {e}") from e
    summary: dict[str, Any] = {"image_size": image_size, "records": {}, "cpus": cpus, "blocks": blocks,
                               "location": base}
    for name, (splits, with_images) in GROUPS.items():
        rows = int(sum(split_counts.get(s, 0) for s in splits))
        loc = storage.join(base, f"group={name}") if shards.remote(storage_path) else f"../_files/group={name}"
        shards.write_manifest(out / name, loc, rows=rows, image_size=image_size if with_images else None,
                              splits=list(splits), group=name, content_key=key)
        summary["records"][name] = rows
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["records_per_s"] = round(n / max(summary["seconds"], 1e-9), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"prepare: {n} records in {summary['seconds']} s ({summary['records_per_s']} records/s, "
          f"{blocks} blocks over {cpus} CPUs) -> {base}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    from g2p.config import load_params
    from pipelines.ray_train import load_ray_section

    p = argparse.ArgumentParser(description="Validated records -> sharded Parquet datasets (Ray Data).")
    p.add_argument("--valid", default="outputs/validation/valid.parquet")
    p.add_argument("--root", default="data", help="the BIOSCAN-5M-layout root the images live under (path or URI)")
    p.add_argument("--out", default="outputs/prepared")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    a = p.parse_args(argv)
    cfg = load_params(a.params)
    section = load_ray_section(a.params)
    summary = prepare(a.valid, a.root, a.out, cfg.vae.image_size, section.storage_path, progress=not a.quiet,
                      object_store_gb=section.object_store_gb)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
