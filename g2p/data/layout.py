"""The BIOSCAN-5M on-disk layout, as the official ``bioscan-dataset`` package reads it.

Everything that names a file, a column, a split or a chunk folder lives here,
so the synthesiser, the importer and the validator write and read one layout.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

METADATA_RELPATH = Path("bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv")
IMAGES_RELDIR = Path("bioscan5m/images")
IMAGE_TYPE = "cropped_256"
# Ground truth sidecar of the synthetic benchmark (absent for real data).
TRUTH_RELPATH = Path("bioscan5m/metadata/synthetic_ground_truth.parquet")

COLUMNS: tuple[str, ...] = (
    "processid", "sampleid", "taxon", "phylum", "class", "order", "family", "subfamily",
    "genus", "species", "dna_bin", "dna_barcode", "country", "province_state",
    "coord-lat", "coord-lon", "image_measurement_value", "area_fraction", "scale_factor",
    "inferred_ranks", "split", "index_bioscan_1M_insect", "chunk",
)

# dtypes as the official package's COLUMN_DTYPES reads them.
COLUMN_DTYPES: dict[str, object] = {
    "processid": str, "sampleid": str, "taxon": "category", "phylum": "category",
    "class": "category", "order": "category", "family": "category", "subfamily": "category",
    "genus": "category", "species": "category", "dna_bin": "category", "dna_barcode": str,
    "country": "category", "province_state": "category", "coord-lat": float, "coord-lon": float,
    "image_measurement_value": float, "area_fraction": float, "scale_factor": float,
    "inferred_ranks": "uint8", "split": str, "index_bioscan_1M_insect": "Int64", "chunk": str,
}

SPLITS: tuple[str, ...] = (
    "pretrain", "train", "val", "test", "key_unseen", "val_unseen", "test_unseen", "other_heldout",
)
SEEN_SPLITS = ("train", "val", "test")
UNSEEN_SPLITS = ("key_unseen", "val_unseen", "test_unseen")


def chunk_for(processid: str, split: str) -> str:
    """The image chunk folder: first two MD5 hex chars (pretrain), first one
    (train, other_heldout), none for the smaller evaluation splits."""
    h = hashlib.md5(processid.encode()).hexdigest()
    if split == "pretrain":
        return h[:2]
    if split in ("train", "other_heldout"):
        return h[:1]
    return ""


def image_relpath(processid: str, split: str, chunk: str | None = None) -> Path:
    """Path of a record's image relative to the dataset root."""
    chunk = chunk_for(processid, split) if chunk is None else chunk
    parts = [IMAGES_RELDIR, IMAGE_TYPE, split] + ([chunk] if chunk else []) + [f"{processid}.jpg"]
    return Path(*parts)
