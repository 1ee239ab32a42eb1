"""The synthetic root reads like the real BIOSCAN-5M through the official loader's logic.

``bioscan-dataset`` (v1.3.0) imports torchvision, which the CPU torch of this
venv cannot host; ``scripts/check_bioscan_package.sh`` (and the integration test
beside it) runs the package itself in its own venv. Here its reading logic is
replayed step by step with pandas: the dtype map and column selection copied
from ``bioscan_dataset/bioscan5m.py``, label index columns from
``.cat.codes``, image paths built as ``split/[chunk/]processid.jpg`` under
``bioscan5m/images/cropped_256``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from g2p.config import preset
from g2p.data.layout import COLUMN_DTYPES, COLUMNS, METADATA_RELPATH, SPLITS
from g2p.data.synth import synthesise

# Verbatim from bioscan_dataset 1.3.0 (bioscan5m.py): COLUMN_DTYPES, USECOLS, VALID_SPLITS.
PACKAGE_COLUMN_DTYPES = {
    "processid": str, "sampleid": str, "taxon": "category", "phylum": "category", "class": "category",
    "order": "category", "family": "category", "subfamily": "category", "genus": "category",
    "species": "category", "dna_bin": "category", "dna_barcode": str, "country": "category",
    "province_state": "category", "coord-lat": float, "coord-lon": float, "image_measurement_value": float,
    "area_fraction": float, "scale_factor": float, "inferred_ranks": "uint8", "split": str,
    "index_bioscan_1M_insect": "Int64", "chunk": str,
}
PACKAGE_USECOLS = [
    "processid", "chunk", "phylum", "class", "order", "family", "subfamily", "genus", "species", "dna_bin",
    "dna_barcode", "country", "province_state", "coord-lat", "coord-lon", "image_measurement_value",
    "area_fraction", "scale_factor", "split",
]
PACKAGE_VALID_SPLITS = ["pretrain", "train", "val", "test", "key_unseen", "val_unseen", "test_unseen",
                        "other_heldout"]
LABEL_COLS = ["phylum", "class", "order", "family", "subfamily", "genus", "species", "dna_bin"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import dataclasses

    out = tmp_path_factory.mktemp("bioscan_root")
    cfg = dataclasses.replace(preset("tiny").data, heldout_species_per_genus=1, other_heldout_per_species=2)
    synthesise(out, cfg)
    return out


def test_layout_matches_the_package() -> None:
    assert COLUMN_DTYPES == PACKAGE_COLUMN_DTYPES
    assert set(PACKAGE_USECOLS) <= set(COLUMNS)
    assert list(SPLITS) == PACKAGE_VALID_SPLITS


def _load_like_the_package(root: Path, split: str) -> pd.DataFrame:
    """``load_bioscan5m_metadata(path, split=split, usecols=USECOLS)``, step by step."""
    df = pd.read_csv(root / METADATA_RELPATH,
                     dtype=PACKAGE_COLUMN_DTYPES, usecols=PACKAGE_USECOLS)
    df["dna_barcode"] = df["dna_barcode"].str[:660]
    df = df.loc[df["split"].isin({split})]
    for c in LABEL_COLS:
        df[c + "_index"] = df[c].cat.codes
    maybe_chunk = df["chunk"].astype(str) + os.path.sep
    maybe_chunk = maybe_chunk.where(df["chunk"].notna(), "")
    df["image_path"] = df["split"] + os.path.sep + maybe_chunk + df["processid"] + ".jpg"
    return df


@pytest.mark.parametrize("split", PACKAGE_VALID_SPLITS)
def test_every_split_loads_and_finds_its_images(root: Path, split: str) -> None:
    df = _load_like_the_package(root, split)
    assert len(df) > 0
    image_dir = root / "bioscan5m" / "images" / "cropped_256"
    assert all((image_dir / p).is_file() for p in df["image_path"])
    assert (df["dna_barcode"].str.len() <= 660).all()
    assert df["coord-lat"].notna().all() and df["coord-lon"].notna().all()
    chunks = df["chunk"].dropna()
    if split == "pretrain":
        assert chunks.str.fullmatch(r"[0-9a-f]{2}").all() and len(chunks) == len(df)
    elif split in ("train", "other_heldout"):
        assert chunks.str.fullmatch(r"[0-9a-f]").all() and len(chunks) == len(df)
    else:
        assert chunks.empty
    species_idx = df["species_index"].to_numpy()
    if split == "pretrain":
        assert (species_idx == -1).all()  # the package's "missing" index
    else:
        assert (species_idx >= 0).all()
    assert (df["order_index"] >= 0).all()


def test_full_dtype_read(root: Path) -> None:
    df = pd.read_csv(root / METADATA_RELPATH, dtype=PACKAGE_COLUMN_DTYPES)
    assert list(df.columns) == list(COLUMNS)
    assert df["inferred_ranks"].dtype == np.uint8
    assert str(df["index_bioscan_1M_insect"].dtype) == "Int64"
    assert (df["image_measurement_value"] > 0).all()
    assert df["area_fraction"].between(0, 1).all() and (df["scale_factor"] > 0).all()
