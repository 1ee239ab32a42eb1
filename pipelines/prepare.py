"""DVC stage ``prepare``: validated records -> model-ready arrays files, with Ray Data.

Reads ``valid.parquet`` (the records the ``validate`` stage let through) as a
Ray dataset and decodes + resizes the images of the image splits to
``vae.image_size`` in ``map_batches`` workers, so the same code spreads a
BIOSCAN-5M-sized subset over a cluster (``RAY_ADDRESS``) as it spreads the
embedded benchmark over the local cores. Tokenisation stays in the training
workers (it depends on ``tokenizer``, which a prepared file should not).

Writes one :func:`pipelines.ray_train.save_arrays` file per split group:

- ``train``, ``val``, ``test``: records with images (uint8, model resolution);
- ``pretrain``: barcodes and places of the ``pretrain`` + ``train`` records,
  no images (the conditioner's MLM stage reads barcodes only).

Records keep the order of ``valid.parquet`` within each file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGE_GROUPS = {"train": ("train",), "val": ("val",), "test": ("test",)}
BARCODE_GROUPS = {"pretrain": ("pretrain", "train")}
COLUMNS = ["processid", "split", "dna_barcode", "coord-lat", "coord-lon", "species", "chunk"]


def _decode_batch(batch: pd.DataFrame, root: str, size: int, splits: list[str]) -> dict[str, np.ndarray]:
    """One Ray Data batch: keep the image splits' rows, decode their images at ``size``."""
    from g2p.data.dataset import load_image
    from g2p.data.layout import image_relpath

    batch = batch[batch["split"].isin(splits)]
    images = np.empty((len(batch), 3, size, size), dtype=np.uint8)
    for i, (pid, split, chunk) in enumerate(zip(batch["processid"], batch["split"], batch["chunk"])):
        chunk = None if pd.isna(chunk) or chunk == "" else str(chunk)
        images[i] = load_image(Path(root) / image_relpath(str(pid), str(split), chunk), size)
    return {"processid": batch["processid"].astype(str).to_numpy(dtype=object), "image": images}


def decode_images(valid: str | Path, root: str | Path, size: int, splits: list[str],
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """processid -> uint8 (3, S, S) image, for rows of ``splits`` (Ray Data)."""
    import ray.data

    from pipelines.ray_train import ensure_ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(str(Path(valid).resolve()), columns=["processid", "split", "chunk"],
                               override_num_blocks=4)
    out = ds.map_batches(_decode_batch, batch_format="pandas", batch_size=batch_size,
                         fn_kwargs={"root": str(Path(root).resolve()), "size": size, "splits": list(splits)})
    images: dict[str, np.ndarray] = {}  # keyed by processid (unique): Ray Data may reorder blocks
    for b in out.iter_batches(batch_format="numpy", batch_size=256):
        images.update(zip(b["processid"].tolist(), b["image"]))
    return images


def _arrays(records: pd.DataFrame, images: np.ndarray | None) -> Any:
    import torch

    from g2p.data.dataset import load_arrays

    arrays = load_arrays(".", records, None)  # places, barcodes, species: no file reads without a size
    arrays.images = None if images is None else torch.from_numpy(images)
    return arrays


def prepare(valid: str | Path, root: str | Path, out: str | Path, image_size: int) -> dict[str, Any]:
    """Write ``out/<group>.safetensors`` for every split group; a summary."""
    from g2p.data.dataset import records_from_frame
    from pipelines.ray_train import save_arrays

    t0 = time.perf_counter()
    df = pd.read_parquet(valid)
    records = records_from_frame(df).reset_index(drop=True)
    image_splits = sorted({s for group in IMAGE_GROUPS.values() for s in group})
    images = decode_images(valid, root, image_size, image_splits)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"image_size": image_size, "records": {}}
    for name, splits in IMAGE_GROUPS.items():
        rows = np.flatnonzero(records["split"].isin(splits).to_numpy())
        pids = records["processid"].to_numpy()[rows]
        stack = np.stack([images[str(pid)] for pid in pids]) if len(rows) else \
            np.empty((0, 3, image_size, image_size), dtype=np.uint8)
        save_arrays(_arrays(records.iloc[rows], stack), out / f"{name}.safetensors")
        summary["records"][name] = int(len(rows))
    for name, splits in BARCODE_GROUPS.items():
        rows = np.flatnonzero(records["split"].isin(splits).to_numpy())
        save_arrays(_arrays(records.iloc[rows], None), out / f"{name}.safetensors")
        summary["records"][name] = int(len(rows))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    from g2p.config import load_params

    p = argparse.ArgumentParser(description="Validated records -> model-ready arrays files (Ray Data).")
    p.add_argument("--valid", default="outputs/validation/valid.parquet")
    p.add_argument("--root", default="data", help="the BIOSCAN-5M-layout root the images live under")
    p.add_argument("--out", default="outputs/prepared")
    p.add_argument("--params", default="params.yaml")
    a = p.parse_args(argv)
    cfg = load_params(a.params)
    summary = prepare(a.valid, a.root, a.out, cfg.vae.image_size)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
