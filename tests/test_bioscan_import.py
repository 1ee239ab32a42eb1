"""Importing a subset of a BIOSCAN-5M download (g2p.data.bioscan), on 25 real records."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from g2p.data.bioscan import import_bioscan, read_metadata, select_records
from g2p.data.layout import COLUMNS, METADATA_RELPATH, image_relpath
from tests.fixtures import build_root, sample_records


def test_read_metadata_uses_the_official_dtypes(bioscan_sample_root: Path) -> None:
    df = read_metadata(bioscan_sample_root)
    assert list(df.columns) == list(COLUMNS) and len(df) == 25
    assert df["species"].dtype == "category" and df["taxon"].dtype == "category"
    assert df["coord-lat"].dtype == "float64" and df["inferred_ranks"].dtype == "uint8"
    assert str(df["index_bioscan_1M_insect"].dtype) == "Int64"
    assert df["index_bioscan_1M_insect"].notna().sum() == 4
    assert pd.api.types.is_string_dtype(df["dna_barcode"])
    assert df["species"].isna().sum() == 21  # empty fields are missing, as pd.read_csv reads them
    # taxon is the most specific rank present
    row = df.set_index("processid").loc["GMMVA27218-22"]
    assert row["taxon"] == "Megaselia" and pd.isna(row["species"])


def test_read_metadata_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="BIOSCAN_5M_Insect_Dataset_metadata.csv"):
        read_metadata(tmp_path)


def test_import_filters_splits_and_keeps_text_and_columns(bioscan_sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "subset"
    summary = import_bioscan(bioscan_sample_root, out, splits=["train", "test"], mode="copy", progress=False)
    assert summary["records_in"] == 25 and summary["records_out"] == 4
    assert summary["per_split"] == {"test": 1, "train": 3}
    assert summary["images_brought"] == 4 and summary["images_missing"] == 0
    src = pd.read_csv(bioscan_sample_root / METADATA_RELPATH, dtype=str, keep_default_na=False)
    got = pd.read_csv(out / METADATA_RELPATH, dtype=str, keep_default_na=False)
    assert list(got.columns) == list(src.columns)
    want = src[src["split"].isin(["train", "test"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)  # same text, file order
    for pid, split in zip(got["processid"], got["split"]):
        rel = image_relpath(pid, split)
        assert (out / rel).read_bytes() == (bioscan_sample_root / rel).read_bytes()


def test_cap_per_species_and_limit_are_deterministic() -> None:
    meta = pd.DataFrame({
        "split": ["train"] * 6 + ["val"] * 2 + ["pretrain"] * 4,
        "species": ["a", "a", "a", "b", "b", "c", "a", "a", None, None, None, None],
    })
    rows = select_records(meta, max_per_species=1, seed=3)
    kept = meta.iloc[rows]
    assert kept.groupby(["split", "species"]).size().max() == 1
    assert set(map(tuple, kept.dropna()[["split", "species"]].to_numpy())) == {
        ("train", "a"), ("train", "b"), ("train", "c"), ("val", "a")}
    assert kept["species"].isna().sum() == 4  # unlabelled records are not capped
    assert (rows == select_records(meta, max_per_species=1, seed=3)).all()
    assert any((select_records(meta, max_per_species=1, seed=s) != rows).any() for s in range(1, 10))
    assert len(select_records(meta, limit=5, seed=0)) == 5
    assert (select_records(meta, limit=5, seed=0) == select_records(meta, limit=5, seed=0)).all()
    with pytest.raises(ValueError, match="unknown"):
        select_records(meta, splits=["training"])


@pytest.mark.parametrize("mode", ["link", "symlink"])
def test_link_modes_and_missing_images_are_carried(tmp_path: Path, mode: str) -> None:
    # A copy of the sample root where two images are gone.
    src = build_root(tmp_path / "src")
    gone = sample_records().query("split == 'pretrain'")["processid"].tolist()[:2]
    for pid in gone:
        (src / image_relpath(pid, "pretrain")).unlink()
    out = tmp_path / "out"
    summary = import_bioscan(src, out, splits=["pretrain"], limit=30, mode=mode, progress=False)
    assert summary["records_out"] == 21  # every pretrain record, images or not
    assert summary["images_missing"] == 2 and set(summary["missing_examples"]) == set(gone)
    got = pd.read_csv(out / METADATA_RELPATH, dtype=str, keep_default_na=False)
    assert set(gone) <= set(got["processid"])
    pid = next(p for p in got["processid"] if p not in gone)
    dst, orig = out / image_relpath(pid, "pretrain"), src / image_relpath(pid, "pretrain")
    if mode == "symlink":
        assert dst.is_symlink() and dst.resolve() == orig.resolve()
    else:
        assert os.stat(dst).st_ino == os.stat(orig).st_ino  # a hard link, same file


def test_import_refuses_to_overwrite_its_source(bioscan_sample_root: Path) -> None:
    with pytest.raises(ValueError, match="differ"):
        import_bioscan(bioscan_sample_root, bioscan_sample_root, progress=False)


def test_cli_import_then_validate(bioscan_sample_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The two commands chain: a subset imported from a download validates cleanly."""
    from pipelines.cli import main

    out = tmp_path / "subset"
    assert main(["data", "import-bioscan", "--root", str(bioscan_sample_root), "--out", str(out),
                 "--splits", "pretrain", "--limit", "5", "--mode", "copy", "--seed", "1", "--quiet"]) == 0
    assert '"records_out": 5' in capsys.readouterr().out
    assert main(["data", "validate", "--root", str(out), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert '"valid": 5' in capsys.readouterr().out
