"""Read a synthetic root with the official ``bioscan-dataset`` package (run in its own venv).

Usage: ``python scripts/check_bioscan_package.py ROOT`` from a venv that has
bioscan-dataset 1.3.0 with torch and torchvision (``check_bioscan_package.sh``
builds one). The package's ``BIOSCAN5M`` class is used as it is, except for its
checksum checks: it compares the metadata CSV with the real file's MD5 and
looks for a few named real images by MD5, which a synthetic root cannot pass.
Those two checks become "the file / the image folder exists"; metadata
loading, split selection, label indexing, image paths and sample reading are
the package's own code.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import pandas as pd

warnings.filterwarnings("ignore")  # torchvision's warnings about CUDA on a CPU-only machine

from bioscan_dataset import BIOSCAN5M  # noqa: E402
from bioscan_dataset.bioscan5m import COLUMN_DTYPES, VALID_SPLITS  # noqa: E402


class SyntheticBIOSCAN5M(BIOSCAN5M):
    """The official class with its MD5 checks of the real release set aside."""

    def _check_integrity_metadata(self, verbose: int = 1) -> bool:
        return os.path.isfile(self.metadata_path)

    def _check_integrity_images(self, split: str | None = None, verbose: int = 1) -> bool:
        return os.path.isdir(self.image_dir)


def main(root: str) -> int:
    csv = os.path.join(root, "bioscan5m", "metadata", "csv", "BIOSCAN_5M_Insect_Dataset_metadata.csv")
    expected = pd.read_csv(csv, dtype=COLUMN_DTYPES)["split"].value_counts()
    modality = ("image", "dna", "coord-lat", "coord-lon")
    for split in VALID_SPLITS + ["seen", "unseen", "all"]:
        ds = SyntheticBIOSCAN5M(root, split=split, modality=modality, target_type=["species", "genus"],
                                target_format="text")
        members = {"seen": ["train", "val", "test"], "unseen": ["key_unseen", "val_unseen", "test_unseen"],
                   "all": VALID_SPLITS}.get(split, [split])
        n = int(sum(expected.get(s, 0) for s in members))
        assert len(ds) == n, f"{split}: package sees {len(ds)} records, the CSV has {n}"
        for i in range(min(3, len(ds))):
            image, dna, lat, lon, (species, genus) = ds[i]
            image.load()
            assert image.mode == "RGB" and image.size[0] == image.size[1], (split, image.size)
            assert 0 < len(dna) <= 660 and set(dna) <= set("ACGTN"), split
            assert not math.isnan(lat) and not math.isnan(lon), split
            labelled = split not in ("pretrain", "all")
            assert (isinstance(species, str)) == labelled or split == "all", (split, species)
        idx = SyntheticBIOSCAN5M(root, split=split, modality=("dna",), target_type="species")
        if len(idx):
            target = idx[0][-1]
            assert (target == -1) == (split == "pretrain") or split == "all", (split, target)
        print(f"{split:14s} {len(ds):6d} records: images, barcodes, coordinates and labels read")
    print("OK: bioscan-dataset read every split of", root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
