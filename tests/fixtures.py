"""A tiny BIOSCAN-5M download in the official layout, from the 25 real records.

Why real records: the importer and the validator must accept what the real
dataset holds (574-668 nt reads with N's, unlabelled pretrain records, chunk
folders), not just what our synthesiser writes. The shared sample lacks the
official ``taxon`` column and the images; the builder adds ``taxon`` as the
dataset defines it (the most specific rank name present) and writes a small
placeholder JPEG at each record's official path. Records: BIOSCAN-5M (CC BY
3.0), credit the BIOSCAN project.

Use in a test module: ``from tests.fixtures import bioscan_sample_root  # noqa: F401``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from g2p.data.dataset import Arrays
from g2p.data.layout import COLUMNS, METADATA_RELPATH, chunk_for, image_relpath

SAMPLE_CSV = Path(__file__).resolve().parent / "data" / "bioscan5m_sample_25.csv"  # shipped, CC BY 3.0
_RANKS = ("species", "genus", "subfamily", "family", "order", "class", "phylum")  # most specific first


def sample_records() -> pd.DataFrame:
    """The 25 real records as text (empty fields as ''), with ``taxon``, in official column order."""
    df = pd.read_csv(SAMPLE_CSV, dtype=str, keep_default_na=False)
    ranks = df[list(_RANKS)].replace("", pd.NA)
    df["taxon"] = ranks.bfill(axis=1).iloc[:, 0].fillna("")
    return df[list(COLUMNS)]


def write_placeholder_jpeg(path: Path, key: str, size: int = 16) -> None:
    """A small solid-colour JPEG (colour from ``key``), standing in for a cropped insect photo."""
    rgb = tuple(hashlib.md5(key.encode()).digest()[:3])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format="JPEG", quality=90)


def build_root(root: Path, records: pd.DataFrame | None = None, images: bool = True) -> Path:
    """Write ``records`` (default: the 25 real ones) and their images under ``root``."""
    df = sample_records() if records is None else records
    meta = root / METADATA_RELPATH
    meta.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(meta, index=False)
    if images:
        for pid, split in zip(df["processid"], df["split"]):
            write_placeholder_jpeg(root / image_relpath(pid, split, chunk_for(pid, split)), pid)
    return root


# Per-species copies in a replicated root (see :func:`replicated_records`).
SEEN_COPIES = {"train": 4, "val": 1, "test": 1}
UNSEEN_COPIES = {"key_unseen": 1, "val_unseen": 1, "test_unseen": 1}


def replicated_records() -> pd.DataFrame:
    """The 25 real records, the 4 species-labelled ones copied into every split the pipeline reads.

    Why: the sample holds 3 ``train`` records, 1 ``test`` and no ``val`` or
    unseen splits, too few for the pipeline (the judge's retrieval reads
    ``val``, ``test``, ``key_unseen`` and ``test_unseen``). Every copy is a real
    record (barcode, taxonomy, place unchanged) under a distinct processid
    ``<processid>-<split><i>`` and the chunk its new split derives. The
    labelled species, sorted, alternate seen (copies :data:`SEEN_COPIES`) and
    unseen (:data:`UNSEEN_COPIES`), so seen and unseen species are disjoint as
    in BIOSCAN-5M. The first ``train`` copy of each seen species and the
    ``test`` copy of the first seen species have their coordinates blanked,
    as many real BIOSCAN-5M records have none. The 21 unlabelled ``pretrain``
    records are kept as they are.
    """
    df = sample_records()
    labelled = df[df["species"] != ""].sort_values("species").reset_index(drop=True)
    rows = [df[df["species"] == ""]]
    for i, rec in labelled.iterrows():
        copies = SEEN_COPIES if i % 2 == 0 else UNSEEN_COPIES
        for split, n in copies.items():
            for j in range(n):
                pid = f"{rec['processid']}-{split}{j}"
                r = rec.copy()
                r["processid"], r["split"], r["chunk"] = pid, split, chunk_for(pid, split)
                r["index_bioscan_1M_insect"] = ""  # a copy is not the 1M dataset's record
                if (split == "train" and j == 0) or (split == "test" and i == 0):
                    r["coord-lat"] = r["coord-lon"] = ""
                rows.append(r.to_frame().T)
    return pd.concat(rows, ignore_index=True)[list(COLUMNS)]


@pytest.fixture(scope="session")
def bioscan_sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only root in the BIOSCAN-5M layout holding the 25 real records and images."""
    return build_root(tmp_path_factory.mktemp("bioscan_sample"))


def two_species_arrays(n: int = 16, seed: int = 0) -> Arrays:
    """Two 'species': barcode family decides the image colour, so there is a map to learn."""
    rng = np.random.default_rng(seed)
    base = ["".join(rng.choice(list("ACGT"), 600)) for _ in range(2)]
    barcodes, images = [], []
    for i in range(n):
        s = i % 2
        seq = list(base[s])
        for p in rng.choice(600, 6, replace=False):
            seq[p] = "ACGT"[rng.integers(4)]
        barcodes.append("".join(seq))
        img = np.full((3, 32, 32), 200, dtype=np.uint8)
        img[s, 8:24, 8:24] = 30  # a dark square in channel 0 or 1
        images.append(img)
    return Arrays(
        processid=np.array([f"P{i}" for i in range(n)]), barcode=barcodes,
        lat=torch.linspace(-40, 40, n), lon=torch.zeros(n), has_place=torch.ones(n, dtype=torch.bool),
        species=np.array([f"sp{i % 2}" for i in range(n)], dtype=object),
        images=torch.from_numpy(np.stack(images)),
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waits
    made a step up to 100x slower (a 2-step tiny sample 9 s instead of 0.1 s under load 11); the
    module's tests run on one thread, restored afterwards.
    Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
