"""The image check of ``g2p data validate``: one Ray Data job over the cluster.

Each record that should have an image (a processid and an official split) is
one row ``(row, processid, split, chunk)``; Ray Data tasks build its path and
judge it with :func:`image_status`; the driver puts each verdict back by
``row`` (Ray may return blocks in any order). With ``image_sample`` N > 0,
only N of those records, drawn with a fixed seed, are checked.

On a cluster (``RAY_ADDRESS``) every node must see the root at the same path
(a shared filesystem), as for ``pipelines.prepare``. This module imports no
Great Expectations: Ray workers import it to run :func:`_status_batch`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from g2p.data.bioscan import record_image_relpath
from g2p.data.layout import SPLITS

IMAGE_SAMPLE_SEED = 0  # which records a sample checks: fixed, so reruns judge the same ones
MIN_IMAGES_PER_BLOCK = 16  # a Ray task costs a few ms; an image check a few ms each
BLOCKS_PER_CPU = 4  # several blocks per CPU: slow files on one node do not hold up the rest
BATCH = 256  # images per map_batches call: verdicts stream back (progress) in pieces this size


def eligible_rows(ids: pa.Table) -> np.ndarray:
    """Rows (from 0) whose record should have an image: a processid and an official split."""
    ok = pc.and_(pc.is_valid(ids.column("processid")),
                 pc.fill_null(pc.is_in(ids.column("split"), pa.array(SPLITS)), False))
    return np.flatnonzero(ok.to_numpy(zero_copy_only=False))


def sample_rows(rows: np.ndarray, sample: int, seed: int = IMAGE_SAMPLE_SEED) -> np.ndarray:
    """``sample`` of ``rows`` at random (fixed seed), in file order; all of them when ``sample`` is 0 or
    at least ``len(rows)``."""
    if sample <= 0 or sample >= len(rows):
        return rows
    pick = np.random.default_rng(seed).choice(len(rows), size=sample, replace=False)
    return rows[np.sort(pick)]


def num_blocks(n: int, cpus: float) -> int:
    """Ray Data blocks for ``n`` images on a cluster of ``cpus`` CPUs: ``BLOCKS_PER_CPU`` per CPU, none
    smaller than ``MIN_IMAGES_PER_BLOCK`` images, at least one."""
    return max(1, min(math.ceil(n / MIN_IMAGES_PER_BLOCK), BLOCKS_PER_CPU * max(1, int(cpus))))


def check_images(root: Path, ids: pa.Table, progress: bool, sample: int = 0) -> np.ndarray:
    """Per record: "ok", "missing", "corrupt", or None where no image is expected (no processid, a split
    outside the official ones) or, with ``sample``, where the record was not drawn."""
    rows = sample_rows(eligible_rows(ids), sample)
    status = np.full(ids.num_rows, None, dtype=object)
    if len(rows) == 0:
        return status
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from pipelines.ray_train import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar, ours, counting images
    take = pa.array(rows, pa.int64())
    todo = pa.table({"row": take, **{c: ids.column(c).take(take) if c in ids.column_names
                                     else pa.nulls(len(rows), pa.string()) for c in ("processid", "split", "chunk")}})
    blocks = num_blocks(len(rows), ray.cluster_resources().get("CPU", 1))
    step = math.ceil(len(rows) / blocks)
    ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, len(rows), step)])
    ds = ds.map_batches(_status_batch, batch_format="pyarrow", batch_size=BATCH,
                        fn_kwargs={"root": str(Path(root).resolve())})
    seen = 0
    with tqdm(total=len(rows), desc="images", unit="img", disable=not progress, mininterval=2.0) as bar:
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            status[b["row"]] = b["status"].astype(object)  # Python str, whatever numpy made of them
            seen += len(b["row"])
            bar.update(len(b["row"]))
    if seen != len(rows):
        raise RuntimeError(f"image check: Ray returned {seen} verdicts for {len(rows)} images")
    return status


def _status_batch(batch: pa.Table, root: str) -> dict[str, np.ndarray]:
    """One Ray Data batch: the verdict of each row's image."""
    base = Path(root)
    cols = [batch.column(c).to_pylist() for c in ("processid", "split", "chunk")]
    verdicts = [image_status(base / record_image_relpath(p, s, c)) for p, s, c in zip(*cols)]
    return {"row": batch.column("row").to_numpy(), "status": np.array(verdicts, dtype=object)}


def image_status(path: Path) -> str:
    """"ok" when the file exists, passes ``PIL.Image.verify`` and decodes (JPEG at
    1/8 scale: every compressed byte is still read, so truncation shows)."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.draft("RGB", (32, 32))
            im.load()
    except Exception:  # noqa: BLE001 -- any failure to decode is the verdict, not an error
        return "corrupt"
    return "ok"
