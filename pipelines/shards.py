"""Sharded datasets on disk or in object storage: the prepared records and their latents.

One format for both (Parquet, one row per record):

    processid, species, barcode   strings
    lat, lon                      float32 (0 where unknown)
    has_place                     bool
    image                         binary: uint8 (3, S, S), C order  (prepared image groups)
    latent                        binary: (C, h, w) in ``dtype``     (latents)

A dataset is a folder with ``manifest.json`` (what the columns hold, how many
rows, which files) and, when it lives on the local disk, its ``part-*.parquet``
files beside it. When the data lives in object storage (``ray.storage_path``
is an ``s3://`` / ``gs://`` URI) the local folder, which is what DVC tracks,
holds the manifest only and ``manifest["location"]`` is the URI of the files,
so a worker on any node reads them without a shared disk.

Why Parquet and not WebDataset tars: Ray Data reads and writes it natively
over pyarrow file systems (S3 and GCS included), readers take only the
columns they need (the conditioner's MLM reads barcodes, never image bytes),
the metadata stays queryable with pandas / DuckDB, and row groups give Ray
Data blocks of a chosen size. Images are stored decoded (raw uint8 at model
resolution) so training never decodes a JPEG again.

A manifest is written last: a folder without one is an interrupted write.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage

FORMAT = "g2p-shards/1"
MANIFEST = "manifest.json"
META_COLUMNS = ["processid", "species", "barcode", "lat", "lon", "has_place"]
# What a task holds at once is sized by these, not by the data set: a writer
# buffers up to a file, a reader or mapper a block or two. Small enough that
# 20 k synthetic records already fill them (so peak memory is flat from there
# up), large enough for object stores (a 256 px BIOSCAN-5M train split is
# ~1,800 files) and for Ray Data's per-block overhead (40 images at 256 px).
TARGET_FILE_BYTES = 32 << 20  # a Parquet file of about 32 MB
TARGET_BLOCK_BYTES = 8 << 20  # a Ray Data block of about 8 MB
SMALL_BYTES = 512 << 20  # a data set this small may be held in the object store (see ray_dataset)


class ShardsError(ValueError):
    """A sharded dataset is missing, incomplete, or not what the reader expects; names the location."""


# ----------------------------------------------------------------------------
# sizes from the data, not constants
# ----------------------------------------------------------------------------


def row_bytes(image_size: int | None = None, latent_shape: Sequence[int] | None = None, itemsize: int = 4) -> int:
    """Approximate bytes of one row: metadata (a COI barcode is ~660 nt) plus image or latent."""
    n = 800
    if image_size:
        n += 3 * image_size * image_size
    if latent_shape:
        n += int(np.prod(latent_shape)) * itemsize
    return n


def rows_per_file(per_row: int) -> int:
    return max(64, TARGET_FILE_BYTES // per_row)


def num_blocks(rows: int, per_row: int, cpus: int) -> int:
    """Blocks for ``rows`` rows: about TARGET_BLOCK_BYTES each, and at least two per CPU (parallelism)."""
    by_size = -(-rows * per_row // TARGET_BLOCK_BYTES)
    return int(max(1, min(rows, max(2 * cpus, by_size))))


def data_context(*, progress: bool = False, preserve_order: bool = False) -> Any:
    """This driver's Ray Data context, set for our stages (tasks inherit it): blocks split at
    TARGET_BLOCK_BYTES (Ray's default, 128 MB, would let a map task's output grow to that)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = TARGET_BLOCK_BYTES
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = progress
    return ctx


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ----------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShardsError(f"{folder}: no {MANIFEST} (not a sharded dataset, or its write was interrupted)")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ShardsError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def is_shards(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def location(folder: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """Where the Parquet files are: the folder itself (local) or the manifest's storage URI."""
    m = manifest or read_manifest(folder)
    return _resolve(folder, m["location"])


def _resolve(folder: str | Path, loc: str) -> str:
    """A manifest's location: a URI as it is, a local path relative to the manifest's folder."""
    return loc if storage.is_uri(loc) else storage.resolve(Path(folder) / loc)


def files(folder: str | Path, manifest: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """(pyarrow file system, the dataset's file paths in it)."""
    m = manifest or read_manifest(folder)
    fs, base = storage.filesystem(location(folder, m))
    return fs, [f"{base.rstrip('/')}/{name}" for name in m["files"]]


def write_manifest(folder: str | Path, loc: str, **fields: Any) -> dict[str, Any]:
    """List the Parquet files at ``loc`` and write ``folder/manifest.json`` (last: it marks completion)."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(_resolve(folder, loc))
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"{loc}: storage unreachable ({e})") from None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    m = {"format": FORMAT, "location": loc, "files": names, **fields}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    return m


def remote(storage_path: str) -> bool:
    """True when ``storage_path`` is an object store (files go there), False for a local path or file://."""
    return storage.is_uri(storage_path) and not str(storage_path).startswith("file://")


# ----------------------------------------------------------------------------
# rows <-> arrays
# ----------------------------------------------------------------------------


def meta_columns(records: Any) -> dict[str, np.ndarray]:
    """The metadata columns from :func:`g2p.data.dataset.records_from_frame` rows (a pandas frame)."""
    lat = records["lat"].to_numpy(dtype="float64")
    lon = records["lon"].to_numpy(dtype="float64")
    has_place = ~(np.isnan(lat) | np.isnan(lon))
    return {
        "processid": records["processid"].astype(str).to_numpy(dtype=object),
        "species": records["species"].astype(str).to_numpy(dtype=object),
        "barcode": records["barcode"].astype(str).to_numpy(dtype=object),
        "lat": np.where(has_place, lat, 0.0).astype(np.float32),
        "lon": np.where(has_place, lon, 0.0).astype(np.float32),
        "has_place": has_place,
    }


def pack(x: np.ndarray) -> np.ndarray:
    """(N, ...) array -> (N,) object array of each row's bytes (a Parquet binary column)."""
    x = np.ascontiguousarray(x)
    return np.array([r.tobytes() for r in x], dtype=object)


def unpack(col: Any, shape: Sequence[int], dtype: str) -> np.ndarray:
    """The inverse of :func:`pack`: a binary column (array of bytes) -> (N, *shape)."""
    rows = list(col)
    if not rows:
        return np.zeros((0, *shape), dtype=dtype)
    return np.frombuffer(b"".join(rows), dtype=dtype).reshape(len(rows), *shape).copy()


def collate(batch: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data numpy batch -> the training stages' batch dict (torch tensors, a list of barcodes)."""
    import torch

    out: dict[str, Any] = {}
    if "barcode" in batch:
        out["barcode"] = [str(b) for b in batch["barcode"]]
    for key, dtype in (("lat", torch.float32), ("lon", torch.float32), ("has_place", torch.bool)):
        if key in batch:
            out[key] = torch.tensor(np.asarray(batch[key]), dtype=dtype)  # a copy: Arrow's buffers are read-only
    if "image" in batch:
        s = manifest["image_size"]
        out["image"] = torch.from_numpy(unpack(batch["image"], (3, s, s), "uint8"))
    if "latent" in batch:
        lat = manifest["latent"]
        out["latent"] = torch.from_numpy(unpack(batch["latent"], lat["shape"], lat["dtype"])).float()
    return out


def ray_dataset(folder: str | Path, columns: Sequence[str] | None = None, *, shuffle: bool = True,
                repeats: int = 1) -> Any:
    """The dataset as a Ray ``Dataset``, streamed; ``shuffle``: block order randomised at each pass.

    ``repeats`` > 1 makes one pass cover that many epochs, for a data set of
    at most SMALL_BYTES only: it is read once into the object store, a file at
    a time from this process (no read tasks to start), and its blocks are
    referenced ``repeats`` times (copies read separately would each start
    their own read chain). Larger data sets
    stream as they are, one epoch a pass, where a pass's start-up is small
    beside the epoch.
    """
    import ray.data

    m = read_manifest(folder)
    if not m["files"]:
        raise ShardsError(f"{folder}: the dataset has no files (0 rows?)")
    fs, paths = files(folder, m)
    per_row = row_bytes(m.get("image_size") if "image" in (columns or ["image"]) else None,
                        (m.get("latent") or {}).get("shape") if "latent" in (columns or ["latent"]) else None)
    blocks = num_blocks(m["rows"], per_row, cluster_cpus())
    cols = list(columns) if columns else None
    if repeats > 1 and m["rows"] * per_row <= SMALL_BYTES:
        ds = ray.data.from_arrow_refs(_small_blocks(fs, paths, cols, -(-m["rows"] // blocks)))
        ds = ds.union(*[ds] * (repeats - 1))
    else:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=cols, override_num_blocks=blocks)
    return ds.randomize_block_order() if shuffle else ds


def _small_blocks(fs: Any, paths: Sequence[str], columns: list[str] | None, rows_per_block: int) -> list[Any]:
    """A small data set's blocks put in the object store from here, one file read at a time: no Ray Data
    read tasks to start (a materialising read costs seconds, which a stage of a few steps would pay)."""
    import pyarrow.parquet as pq
    import ray

    refs = []
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=columns)
        for a in range(0, table.num_rows, rows_per_block):
            refs.append(ray.put(table.slice(a, rows_per_block)))
        del table
    return refs


def load_arrays(folder: str | Path, image_size: int | None = None) -> Any:
    """The whole dataset in memory as :class:`g2p.data.dataset.Arrays` (small consumers: grids, evaluation).

    Rows come sorted by ``processid``, whatever order the writer left them
    in (Ray Data may bundle a partitioned write's blocks out of order), so
    every reader sees the same order; ``image_size`` checks the stored
    resolution (``None`` skips the images).
    """
    import pyarrow.parquet as pq
    import torch

    from g2p.data.dataset import Arrays

    m = read_manifest(folder)
    if image_size and m.get("image_size") not in (None, image_size):
        raise ShardsError(f"{folder}: images are {m['image_size']} px, the VAE wants {image_size}")
    fs, paths = files(folder, m)
    cols = META_COLUMNS + (["image"] if image_size and m.get("image_size") else [])
    tables = [pq.read_table(p, filesystem=fs, columns=cols) for p in paths]
    if tables:
        import pyarrow as pa

        t = pa.concat_tables(tables).sort_by("processid")
        d = {c: t.column(c).to_numpy(zero_copy_only=False) for c in cols}
    else:
        d = {c: np.zeros(0) for c in cols}
    batch = collate(d, m)
    return Arrays(processid=np.asarray(d["processid"], dtype=str), barcode=batch["barcode"],
                  lat=batch["lat"], lon=batch["lon"], has_place=batch["has_place"],
                  species=np.asarray(d["species"], dtype=object),
                  images=batch.get("image") if image_size else None) if tables else Arrays(
        processid=np.array([], dtype=str), barcode=[], lat=torch.zeros(0), lon=torch.zeros(0),
        has_place=torch.zeros(0, dtype=torch.bool), species=np.array([], dtype=object),
        images=torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8) if image_size else None)


def write_arrays(arrays: Any, folder: str | Path, *, latents: Any = None, vae_version: str | None = None,
                 scaling_factor: float | None = None, content_key: str = "arrays") -> dict[str, Any]:
    """Write in-memory :class:`Arrays` (and optionally their latents) as a local sharded dataset, one file.

    For tests and small tools; the pipeline writes shards with Ray Data
    (``prepare``, ``encode_latents``). The layout is the same.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cols: dict[str, Any] = {
        "processid": [str(x) for x in arrays.processid], "species": [str(x) for x in arrays.species],
        "barcode": list(arrays.barcode), "lat": arrays.lat.numpy().astype(np.float32),
        "lon": arrays.lon.numpy().astype(np.float32), "has_place": arrays.has_place.numpy().astype(bool),
    }
    fields: dict[str, Any] = {"rows": len(arrays), "content_key": content_key,
                              "image_size": None if arrays.images is None else int(arrays.images.shape[-1])}
    if arrays.images is not None:
        cols["image"] = pa.array(list(pack(arrays.images.numpy())), type=pa.binary())
    if latents is not None:
        z = latents.detach().cpu().float().numpy()
        cols["latent"] = pa.array(list(pack(z)), type=pa.binary())
        fields["latent"] = {"shape": list(z.shape[1:]), "dtype": "float32", "vae_version": vae_version,
                            "scaling_factor": scaling_factor}
    (folder / "_files").mkdir(exist_ok=True)
    for old in (folder / "_files").glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.table(cols), folder / "_files" / "part-000000.parquet")
    return write_manifest(folder, "_files", **fields)


def read_arrays_latents(folder: str | Path) -> dict[str, Any]:
    """processid -> latent tensor of a (small) latents dataset, in memory: for tests and inspection."""
    import pyarrow.parquet as pq
    import torch

    m = read_manifest(folder)
    fs, paths = files(folder, m)
    out: dict[str, Any] = {}
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=["processid", "latent"])
        z = unpack(t.column("latent").to_pylist(), m["latent"]["shape"], m["latent"]["dtype"])
        out.update(zip(t.column("processid").to_pylist(), torch.from_numpy(z).float()))
    return out
