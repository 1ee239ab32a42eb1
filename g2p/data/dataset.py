"""Model-ready arrays from a root in the BIOSCAN-5M layout.

A small data set (the embedded default: a few thousand records) fits in memory
as uint8 images at model resolution plus token ids; ``prepare`` (issue 4)
writes the same arrays as shards for larger runs. Everything here is
deterministic: the same records and seed give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from g2p.data.layout import image_relpath


@dataclass
class Arrays:
    """Aligned per-record arrays; index i is one record."""

    processid: np.ndarray  # (N,) str
    barcode: list[str]
    lat: torch.Tensor  # (N,) float32, 0 where unknown
    lon: torch.Tensor  # (N,) float32
    has_place: torch.Tensor  # (N,) bool
    species: np.ndarray  # (N,) str ('' where unlabelled)
    images: torch.Tensor | None  # (N, 3, S, S) uint8, or None (barcodes only)

    def __len__(self) -> int:
        return len(self.barcode)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Arrays":
        idx = np.asarray(idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        return Arrays(
            processid=self.processid[idx], barcode=[self.barcode[i] for i in idx],
            lat=self.lat[t], lon=self.lon[t], has_place=self.has_place[t], species=self.species[idx],
            images=None if self.images is None else self.images[t],
        )


def concat_arrays(parts: Sequence[Arrays]) -> Arrays:
    """The records of ``parts`` one after another (images all present at one size, or all absent)."""
    if not parts:
        raise ValueError("parts: nothing to concatenate")
    with_images = {p.images is not None for p in parts}
    if len(with_images) > 1:
        raise ValueError("parts: some carry images and some do not")
    sizes = {tuple(p.images.shape[1:]) for p in parts if p.images is not None}
    if len(sizes) > 1:
        raise ValueError(f"parts: images of different shapes {sorted(sizes)}; load them at one image_size")
    return Arrays(
        processid=np.concatenate([np.asarray(p.processid) for p in parts]),
        barcode=[b for p in parts for b in p.barcode],
        lat=torch.cat([p.lat for p in parts]), lon=torch.cat([p.lon for p in parts]),
        has_place=torch.cat([p.has_place for p in parts]),
        species=np.concatenate([np.asarray(p.species, dtype=object) for p in parts]),
        images=torch.cat([p.images for p in parts]) if parts[0].images is not None else None,
    )


def records_from_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The columns the model reads, from metadata or ``valid.parquet`` rows."""
    barcode_col = "dna_barcode_normalised" if "dna_barcode_normalised" in df else "dna_barcode"
    lat = pd.to_numeric(df["coord-lat"], errors="coerce")
    lon = pd.to_numeric(df["coord-lon"], errors="coerce")
    return pd.DataFrame({
        "processid": df["processid"].astype(str).to_numpy(),
        "split": df["split"].astype(str).to_numpy(),
        "barcode": df[barcode_col].astype(str).to_numpy(),
        "lat": lat.to_numpy(dtype="float64"),
        "lon": lon.to_numpy(dtype="float64"),
        "species": df["species"].astype("string").fillna("").to_numpy(dtype=object),
        "chunk": df["chunk"].astype("string").fillna("").to_numpy(dtype=object)
        if "chunk" in df else np.full(len(df), None),
    })


def load_image(path: Path, size: int) -> np.ndarray:
    """One RGB image resized to ``size`` (bicubic, antialiased), uint8 (3, S, S)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_arrays(root: str | Path, records: pd.DataFrame, image_size: int | None,
                progress: bool = False) -> Arrays:
    """Arrays for ``records`` (see :func:`records_from_frame`); images when ``image_size``."""
    root = Path(root)
    lat = np.nan_to_num(records["lat"].to_numpy(dtype="float64"), nan=0.0)
    lon = np.nan_to_num(records["lon"].to_numpy(dtype="float64"), nan=0.0)
    has_place = ~(np.isnan(records["lat"].to_numpy(dtype="float64"))
                  | np.isnan(records["lon"].to_numpy(dtype="float64")))
    images = None
    if image_size:
        out = np.empty((len(records), 3, image_size, image_size), dtype=np.uint8)
        rows = zip(records["processid"], records["split"], records["chunk"])
        it = enumerate(rows)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(records), desc="load images", unit="img", mininterval=2.0)
        for i, (pid, split, chunk) in it:
            chunk = None if chunk is None or (isinstance(chunk, float) and np.isnan(chunk)) else chunk
            out[i] = load_image(root / image_relpath(pid, split, chunk), image_size)
        images = torch.from_numpy(out)
    return Arrays(
        processid=records["processid"].to_numpy(), barcode=list(records["barcode"]),
        lat=torch.tensor(lat, dtype=torch.float32), lon=torch.tensor(lon, dtype=torch.float32),
        has_place=torch.tensor(has_place), species=records["species"].to_numpy(dtype=object),
        images=images,
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1], the VAE's input range."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, the inverse of :func:`to_unit_range` (clamped)."""
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Index batches of one epoch: a seeded permutation, sharded by rank.

    Every rank sees ``n // world_size`` distinct records per epoch (the
    permutation is shared, the shard is strided), so data-parallel workers
    never train on the same example in the same epoch.
    """
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    shard = perm[rank::world_size][: n // world_size]
    stop = len(shard) - (len(shard) % batch_size if drop_last else 0)
    if stop == 0 and len(shard):
        stop = len(shard)  # fewer records than one batch: one smaller batch
    for i in range(0, stop, batch_size):
        yield shard[i:i + batch_size]
