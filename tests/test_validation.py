"""``g2p data validate`` with real Great Expectations (pipelines.validation).

Real records pass; a crafted root holding one record of every kind of fault
sends each to quarantine with exactly its reasons, and nothing is lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from g2p.config import ValidateConfig
from g2p.data.layout import METADATA_RELPATH, chunk_for, image_relpath
from pipelines.validation import ValidationFailed, validate_root
from tests.fixtures import build_root, sample_records, write_placeholder_jpeg

pytestmark = pytest.mark.integration

LENIENT = ValidateConfig(max_reject_fraction=1.0)


def _crafted() -> tuple[pd.DataFrame, dict[str, set[str]], list[str]]:
    """The 25 real records plus faulty ones; returns (records, processid -> expected rules, no-image pids)."""
    real = sample_records()
    base = real[real["split"] == "pretrain"].iloc[0]
    bc = base["dna_barcode"]
    rows, expect = [], {}

    def add(pid: str, rules: set[str], **fields: str) -> None:
        r = base.copy()
        r["processid"], r["sampleid"] = pid, "S" + pid
        for k, v in fields.items():
            r[k.replace("_", "-") if k.startswith("coord") else k] = v
        r["chunk"] = chunk_for(pid, r["split"]) if r["split"] in ("pretrain", "train") else ""
        rows.append(r)
        expect[pid] = rules

    add("BAD-ALPHA", {"dna_barcode.alphabet"}, dna_barcode=bc[:300] + "XJ" + bc[302:])
    add("BAD-SHORT", {"dna_barcode.length"}, dna_barcode=bc[:150])
    add("BAD-MANYN", {"dna_barcode.n_fraction"}, dna_barcode="N" * 120 + bc[120:])
    add("BAD-LAT95", {"coord-lat.range"}, coord_lat="95")
    add("BAD-LON200", {"coord-lon.range"}, coord_lon="-200")
    add("BAD-LATONLY", {"coordinates.both_or_neither"}, coord_lon="")
    add("BAD-NONNUM", {"coord-lat.numeric"}, coord_lat="north")
    add("BAD-SPLIT", {"split.known"}, split="training")
    add("BAD-NOIMG", {"image.present"})
    add("BAD-CORRUPT", {"image.decodable"})
    add("BAD-TRUNC", {"image.decodable"})
    add("BAD-MANY", {"dna_barcode.alphabet", "coord-lat.range", "coordinates.both_or_neither"},
        dna_barcode=bc.replace("A", "Z", 3), coord_lat="95.5", coord_lon="")
    add("DUP-1", {"processid.unique"})
    add("DUP-1", {"processid.unique"})
    add("OK-NOPLACE", set(), coord_lat="", coord_lon="")
    add("OK-MESSY", set(), dna_barcode="  " + bc[:50].lower() + "--" + bc[50:100].replace("A", "R", 2) + bc[100:])
    df = pd.concat([real, pd.DataFrame(rows)], ignore_index=True)
    return df, expect, ["BAD-NOIMG", "BAD-SPLIT"]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]], pd.DataFrame]:
    df, expect, no_image = _crafted()
    root = tmp_path_factory.mktemp("crafted")
    build_root(root, df, images=False)
    for pid, split in zip(df["processid"], df["split"]):
        if pid not in no_image:
            write_placeholder_jpeg(root / image_relpath(pid, split), pid)
    (root / image_relpath("BAD-CORRUPT", "pretrain")).write_bytes(b"not a jpeg at all")
    good = (root / image_relpath("OK-MESSY", "pretrain")).read_bytes()
    (root / image_relpath("BAD-TRUNC", "pretrain")).write_bytes(good[: len(good) // 2])
    return root, expect, df


@pytest.fixture(scope="module")
def crafted_result(crafted, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root, _, _ = crafted
    out = tmp_path_factory.mktemp("crafted_out")
    return validate_root(root, out, LENIENT, progress=False), out


def test_the_25_real_records_pass(bioscan_sample_root: Path, tmp_path: Path) -> None:
    summary = validate_root(bioscan_sample_root, tmp_path, ValidateConfig(max_reject_fraction=0.0), progress=False)
    assert summary["records_in"] == summary["valid"] == 25 and summary["quarantined"] == 0
    assert summary["gx_success"] and summary["images_checked"] == 25
    valid = pd.read_parquet(tmp_path / "valid.parquet")
    src = pd.read_csv(bioscan_sample_root / METADATA_RELPATH, dtype=str, keep_default_na=False)
    assert valid["processid"].tolist() == src["processid"].tolist()
    assert valid["dna_barcode"].tolist() == [s[:660] for s in src["dna_barcode"]]  # normalised
    long = [s if len(s) > 660 else None for s in src["dna_barcode"]]
    assert valid["dna_barcode_raw"].replace({float("nan"): None}).tolist() == long and any(long)  # where it changed
    assert valid["has_place"].all() and valid["coord-lat"].dtype == "float64"
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_every_fault_is_quarantined_with_exactly_its_reasons(crafted, crafted_result) -> None:
    root, expect, df = crafted
    summary, out = crafted_result
    q = pd.read_parquet(out / "quarantine.parquet")
    v = pd.read_parquet(out / "valid.parquet")
    assert summary["records_in"] == len(df) == summary["valid"] + summary["quarantined"] == len(v) + len(q)
    bad = {p for p, rules in expect.items() if rules}
    assert set(q["processid"]) == bad and len(q) == len(bad) + 1  # both DUP-1 copies
    for _, row in q.iterrows():
        reasons = json.loads(row["reasons"])
        assert {r["rule"] for r in reasons} == expect[row["processid"]] == set(row["rules"]), row["processid"]
        assert all(r["column"] and r["expectation"].startswith("expect_") for r in reasons)
    by_pid = q.set_index("processid")
    assert json.loads(by_pid.loc["BAD-NONNUM", "reasons"])[0]["value"] == "north"
    assert json.loads(by_pid.loc["BAD-ALPHA", "reasons"])[0]["value"] == "JX"
    many = {r["rule"]: r for r in json.loads(by_pid.loc["BAD-MANY", "reasons"])}
    assert many["coordinates.both_or_neither"]["column"] == "coord-lon" and many["coord-lat.range"]["value"] == 95.5
    assert json.loads(by_pid.loc["BAD-NOIMG", "reasons"])[0]["value"].endswith("BAD-NOIMG.jpg")


def test_nothing_is_lost(crafted, crafted_result) -> None:
    """Quarantine keeps each rejected record's source text; valid keeps the rest."""
    _, _, df = crafted
    _, out = crafted_result
    q = pd.read_parquet(out / "quarantine.parquet")
    src = df.reset_index(drop=True)
    for col in ("processid", "sampleid", "dna_barcode", "coord-lat", "coord-lon", "split", "taxon"):
        got = q[col].fillna("").astype(str).tolist()
        assert got == src.loc[q["row"], col].tolist(), col
    v = pd.read_parquet(out / "valid.parquet")
    assert sorted(v["processid"].tolist() + q["processid"].tolist()) == sorted(src["processid"].tolist())


def test_no_place_is_valid_and_normalisation_is_not_a_fault(crafted_result) -> None:
    summary, out = crafted_result
    v = pd.read_parquet(out / "valid.parquet").set_index("processid")
    assert not v.loc["OK-NOPLACE", "has_place"] and pd.isna(v.loc["OK-NOPLACE", "coord-lat"])
    assert summary["valid_without_place"] == 1
    messy = v.loc["OK-MESSY"]
    assert messy["dna_barcode_raw"].startswith("  ") and set(messy["dna_barcode"]) <= set("ACGTN")
    assert pd.isna(v.loc["OK-NOPLACE", "dna_barcode_raw"])


def test_summary_reports_gx_counts_per_expectation(crafted_result) -> None:
    summary, out = crafted_result
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    e = summary["expectations"]
    assert e["processid.unique"]["unexpected_count"] == 2
    assert e["image.decodable"]["unexpected_count"] == 2
    assert e["dna_barcode.alphabet"]["unexpected_count"] == 2
    assert e["coordinates.both_or_neither"]["expectation"] == "expect_column_pair_values_to_be_equal"
    assert summary["gx_success"] is False and summary["gx_statistics"]["evaluated_expectations"] == len(e)
    assert summary["worst_expectations"][0] in e and len(summary["worst_expectations"]) == 3
    assert (out / "data_docs" / "index.html").is_file()
    assert list((out / "data_docs" / "validations").rglob("*.html"))


def test_too_many_rejects_fail_after_writing_everything(crafted, tmp_path: Path) -> None:
    root, _, _ = crafted
    with pytest.raises(ValidationFailed, match="worst expectations: ") as err:
        validate_root(root, tmp_path, ValidateConfig(max_reject_fraction=0.1), progress=False)
    for name in ("valid.parquet", "quarantine.parquet", "summary.json", "data_docs/index.html"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    assert not s["passed"] and s["records_in"] == s["valid"] + s["quarantined"] == err.value.summary["records_in"]
    assert s["worst_expectations"][0] in str(err.value)


def test_cli_validate_exit_codes(crafted, tmp_path: Path) -> None:
    from pipelines.cli import main

    root, _, _ = crafted
    params = tmp_path / "params.yaml"
    params.write_text("validate:\n  max_reject_fraction: 0.0\n")
    assert main(["data", "validate", "--root", str(root), "--out", str(tmp_path / "o"),
                 "--params", str(params), "--quiet"]) == 1
    assert (tmp_path / "o" / "summary.json").is_file()


def test_header_only_and_missing_columns(tmp_path: Path) -> None:
    root = build_root(tmp_path / "empty", sample_records().iloc[:0], images=False)
    s = validate_root(root, tmp_path / "o1", LENIENT, progress=False)
    assert s["records_in"] == s["valid"] == s["quarantined"] == 0
    assert pd.read_parquet(tmp_path / "o1" / "valid.parquet").empty
    broken = build_root(tmp_path / "broken", sample_records().drop(columns=["coord-lon"]), images=False)
    with pytest.raises(ValueError, match="coord-lon"):
        validate_root(broken, tmp_path / "o2", LENIENT, progress=False)


def test_relative_output_folder_as_dvc_runs_it(bioscan_sample_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """dvc.yaml passes relative paths; GX's Data Docs store needs them resolved."""
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["data", "validate", "--root", str(bioscan_sample_root), "--out", "outputs/validation",
                 "--quiet"]) == 0
    assert (tmp_path / "outputs/validation/data_docs/index.html").exists()


def test_ray_image_check_matches_the_per_record_function(crafted) -> None:
    """The Ray Data job (several blocks, results joined back by row) gives each record's own verdict."""
    from g2p.data.bioscan import record_image_relpath
    from g2p.data.layout import SPLITS
    from pipelines.image_check import check_images, eligible_rows, image_status, num_blocks
    from pipelines.metadata_csv import metadata_columns, read_ids

    root, _, _ = crafted
    ids = read_ids(root, metadata_columns(root))
    assert num_blocks(len(eligible_rows(ids)), 2) > 1
    got = check_images(root, ids, progress=False)
    want = [image_status(root / record_image_relpath(p, s, c)) if p is not None and s in SPLITS else None
            for p, s, c in zip(*(ids.column(k).to_pylist() for k in ("processid", "split", "chunk")))]
    assert got.tolist() == want
    assert {None, "ok", "missing", "corrupt"} <= set(want)


def test_image_sample_checks_a_seeded_subset_only(crafted, tmp_path: Path) -> None:
    from pipelines.image_check import eligible_rows, num_blocks, sample_rows
    from pipelines.metadata_csv import metadata_columns, read_ids

    root, expect, df = crafted
    ids = read_ids(root, metadata_columns(root))
    rows = sample_rows(eligible_rows(ids), 12)
    assert rows.tolist() == sample_rows(eligible_rows(ids), 12).tolist() and len(set(rows.tolist())) == 12
    s = validate_root(root, tmp_path, ValidateConfig(max_reject_fraction=1.0, image_sample=12), progress=False)
    assert s["images_checked"] == 12 and s["images"] == {
        "checked": 12, "expected": len(eligible_rows(ids)), "sample": True, "seed": 0}
    sampled = set(df["processid"].iloc[rows])
    image_rules = {"image.present", "image.decodable"}
    want = {p for p, r in expect.items() if r - image_rules or (r & image_rules and p in sampled)}
    q = pd.read_parquet(tmp_path / "quarantine.parquet")
    assert set(q["processid"]) == want
    for _, row in q.iterrows():  # an unsampled record is not judged on its image
        assert set(row["rules"]) == (expect[row["processid"]] if row["processid"] in sampled
                                     else expect[row["processid"]] - image_rules)
    assert s["expectations"]["image.present"]["element_count"] == len(df)
    everything = validate_root(root, tmp_path / "all", ValidateConfig(max_reject_fraction=1.0, image_sample=10**6),
                               progress=False)
    assert not everything["images"]["sample"] and everything["images_checked"] == len(eligible_rows(ids))
    assert [num_blocks(n, 2) for n in (0, 10, 40, 10**6)] == [1, 1, 3, 8] and num_blocks(10**6, 64) == 256


def test_metadata_stream_reads_ahead_a_bounded_amount(tmp_path: Path) -> None:
    """Arrow's own streaming CSV reader, left unread, buffers the whole file; ours holds a few blocks,
    and its batches are the file's rows, in order, typed as the one-shot reader types them."""
    import time

    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from g2p.data.bioscan import arrow_types
    from pipelines import metadata_csv as v

    n = 60_000
    df = pd.DataFrame({"processid": [f"P{i:07d}" for i in range(n)], "split": "pretrain",
                       "dna_barcode": "ACGT" * 165, "coord-lat": "1.5", "coord-lon": "", "chunk": "x"})
    path = tmp_path / METADATA_RELPATH
    path.parent.mkdir(parents=True)
    df.to_csv(path, index=False)
    size = path.stat().st_size
    assert size > 9 * v._BLOCK  # 41 MB

    def held_after_one_batch(open_reader, settled) -> int:
        """Bytes Arrow holds once the reader, one batch taken, is ``settled(reader, held, polls held was
        unchanged)``: polled, not a fixed sleep (a loaded box reads slowly), within a generous limit."""
        before = pa.total_allocated_bytes()
        reader = open_reader()
        next(iter(reader))
        deadline, last, still = time.monotonic() + 300, -1, 0
        while time.monotonic() < deadline:
            held = pa.total_allocated_bytes() - before
            still = still + 1 if held == last else 0
            if settled(reader, held, still):
                break
            last = held
            time.sleep(0.05)
        held = pa.total_allocated_bytes() - before
        reader.close()
        return held

    def at_gate(stream, held, still) -> bool:  # it has read all it may, and what it read is allocated
        return stream._gate._pos >= stream._gate._allowed and still >= 10

    plain = held_after_one_batch(lambda: pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=v._BLOCK)),
                                 lambda reader, held, still: held > size // 2)
    assert plain > size // 2  # the behaviour the gate exists for (reached on its own, however slowly)
    assert held_after_one_batch(lambda: v.MetadataStream(tmp_path), at_gate) < (v._AHEAD + 3) * v._BLOCK
    with v.MetadataStream(tmp_path) as stream:
        got = pa.Table.from_batches(list(stream))
    want = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=arrow_types(v.TEXT_COLUMNS),
                                                                      strings_can_be_null=True))
    assert got.equals(want)
    assert v.read_ids(tmp_path, v.metadata_columns(tmp_path)).column("processid").to_pylist() == \
        df["processid"].tolist()
    df.drop(columns=["coord-lat"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['coord-lat'\]"):
        v.metadata_columns(tmp_path)
    assert np.all(got.column("split").to_numpy(zero_copy_only=False) == "pretrain")
