"""Test records the page offers: validated records of the test splits and their real images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g2p.data.bioscan import record_image_relpath

TEST_SPLITS = ("test", "test_unseen")


@dataclass
class Records:
    """``valid.parquet`` rows of the test splits (lazy-free: loaded once, a few hundred rows)."""

    rows: list[dict[str, Any]]
    data_root: Path | None

    @classmethod
    def load(cls, valid_parquet: str | Path | None, data_root: str | Path | None = None,
             splits: tuple[str, ...] = TEST_SPLITS, limit: int = 1000) -> "Records":
        if valid_parquet is None or not Path(valid_parquet).exists():
            return cls([], None)
        import pandas as pd

        cols = ["processid", "species", "dna_barcode", "coord-lat", "coord-lon", "split", "chunk"]
        df = pd.read_parquet(valid_parquet)
        df = df[[c for c in cols if c in df.columns]]
        df = df[df["split"].isin(splits)].head(limit)
        root = Path(data_root) if data_root is not None else None
        rows = []
        for r in df.to_dict("records"):
            lat, lon = r.get("coord-lat"), r.get("coord-lon")
            path = (root / record_image_relpath(r["processid"], r["split"], r.get("chunk"))) if root else None
            rows.append({
                "processid": r["processid"], "species": r.get("species"), "split": r["split"],
                "barcode": r["dna_barcode"],
                "latitude": None if lat is None or (isinstance(lat, float) and math.isnan(lat)) else float(lat),
                "longitude": None if lon is None or (isinstance(lon, float) and math.isnan(lon)) else float(lon),
                "has_image": bool(path is not None and path.exists()),
                "_image": str(path) if path is not None else None,
            })
        return cls(rows, root)

    def public(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rows]

    def image_path(self, processid: str) -> Path | None:
        for r in self.rows:
            if r["processid"] == processid and r["has_image"]:
                return Path(r["_image"])
        return None
