"""``g2p data validate``: judge a root in the BIOSCAN-5M layout, keep or quarantine each record.

Flow (one pass over the CSV, Arrow throughout, nothing per record in Python
except rejected records):

1. stream the metadata in blocks; per block, :mod:`g2p.data.normalise`
   normalises barcodes and reads coordinates (the one home of those rules),
   giving derived per-record columns and a row mask per rule;
2. processid duplicates over the whole file; image status where checked;
3. Great Expectations runs the suite (:mod:`pipelines.gx_suite`) over the
   derived frame and builds Data Docs; its unexpected count per expectation
   is what the summary reports, and must equal the rule's mask count (else
   the suite and the rules disagree, an error);
4. write ``valid.parquet``, ``quarantine.parquet`` (one row per rejected
   record: its source fields unchanged plus every reason as JSON),
   ``summary.json`` and ``data_docs/``; then fail if too many were rejected.

Decisions: every copy of a duplicated processid is rejected (GX's uniqueness
semantics; which copy is right cannot be known, and each claims the same
image). A record with no coordinates is valid with ``has_place`` False.
``valid.parquet`` keeps the official columns, with ``dna_barcode`` normalised
(the barcode every consumer wants, under its official name) and coordinates
as float64, plus ``dna_barcode_raw`` (the source text where normalisation
changed it, else null: nothing is lost, and a second full barcode column
would double the write at 5M records) and ``has_place``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from g2p.config import ValidateConfig
from g2p.data.bioscan import arrow_types, metadata_path, record_image_relpath
from g2p.data.layout import SPLITS
from g2p.data.normalise import MAX_NUCLEOTIDES, BarcodeRules, barcode_checks, coordinate_checks
from pipelines.gx_suite import Rule, SuiteResult, build_rules, run_suite

TEXT_COLUMNS = ("processid", "dna_barcode", "coord-lat", "coord-lon", "split", "chunk")
REQUIRED = ("processid", "dna_barcode", "coord-lat", "coord-lon", "split")
_BLOCK = 16 << 20  # CSV bytes per streamed block
_SLICE = 1 << 18  # records per written row group


class ValidationFailed(RuntimeError):
    """More records were rejected than ``max_reject_fraction`` allows (outputs are written)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def validate_root(root: Path, out: Path, cfg: ValidateConfig, progress: bool = True) -> dict[str, Any]:
    """Validate ``root``; write valid/quarantine/summary/Data Docs under ``out``; return the summary.

    Raises :class:`ValidationFailed` (after writing everything) when the
    rejected share exceeds ``cfg.max_reject_fraction``.
    """
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock, timings = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = round(now - clock, 2), now

    table, d = read_and_derive(root, cfg)
    lap("read_and_rules")
    n = table.num_rows
    id_and_split_rules(table, d)
    lap("ids_and_splits")
    if cfg.check_images:
        d["image"] = check_images(root, table, progress)
        d["masks"]["image.present"] = d["image"] == "missing"
        d["masks"]["image.decodable"] = d["image"] == "corrupt"
        lap("images")

    rules = build_rules(cfg)
    rejected = np.zeros(n, bool)
    for r in rules:
        rejected |= d["masks"][r.key]
    has_place = d["lat_given"] & d["lon_given"]
    # The files are written (C++, GIL released) while GX runs (mostly pandas).
    with ThreadPoolExecutor(max_workers=1) as pool:
        writing = pool.submit(_timed, write_outputs, table, d, rules, rejected, has_place, out)
        suite = run_suite(derived_frame(d, cfg.check_images), rules, out / "data_docs")
        lap("great_expectations")
        timings["write_alongside_gx"] = writing.result()
    lap("write_wait")
    for r in rules:  # GX is the authority for counts; the masks give the rows
        gx_count, rule_count = suite.per_rule[r.key]["unexpected_count"], int(d["masks"][r.key].sum())
        if gx_count != rule_count:
            raise RuntimeError(f"rule {r.key}: GX counts {gx_count} unexpected, g2p.data.normalise "
                               f"{rule_count}: the suite and the rules disagree")

    summary = _summary(root, out, cfg, rules, suite, n, rejected, has_place, timings,
                       images_checked=sum(s is not None for s in d["image"]) if cfg.check_images else 0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["reject_fraction"] > cfg.max_reject_fraction:
        worst = ", ".join(f"{k} ({summary['expectations'][k]['unexpected_count']})"
                          for k in summary["worst_expectations"])
        raise ValidationFailed(
            f"{summary['quarantined']} of {n} records rejected ({summary['reject_fraction']:.2%} > "
            f"max_reject_fraction {cfg.max_reject_fraction:.2%}); worst expectations: {worst}; "
            f"see {out / 'quarantine.parquet'} and {out / 'data_docs' / 'index.html'}", summary)
    return summary


def read_and_derive(root: Path, cfg: ValidateConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Stream the CSV; per block apply the barcode and coordinate rules.

    Returns the records (``dna_barcode`` normalised; the source text where
    normalisation changed it kept as ``_raw``, or, for a read merely trimmed
    past 660 nt, as just the trimmed ``_tail``: a quarter of a synthetic 5M
    table is trimmed, and whole copies cost 0.9 GB) and the derived columns
    and masks, keyed as the suite names them.
    """
    reader = pacsv.open_csv(
        metadata_path(root), read_options=pacsv.ReadOptions(block_size=_BLOCK),
        convert_options=pacsv.ConvertOptions(column_types=arrow_types(TEXT_COLUMNS), strings_can_be_null=True),
    )
    missing = [c for c in REQUIRED if c not in reader.schema.names]
    if missing:
        raise ValueError(f"{metadata_path(root)}: missing column(s) {missing}")
    rules = BarcodeRules(cfg.min_length, cfg.max_length, cfg.max_n_fraction)
    batches, parts = [], []
    # Blocks are judged in worker threads while the reader parses the next
    # ones (Arrow and numpy release the GIL); a short queue bounds memory.
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for batch in reader:
            pending.append(pool.submit(_derive_batch, batch, rules))
            while len(pending) > 3 or (pending and pending[0].done()):
                b, part = pending.popleft().result()
                batches.append(b)
                parts.append(part)
        for f in pending:
            b, part = f.result()
            batches.append(b)
            parts.append(part)
    if not batches:  # a header only: zero-length columns of the right kinds
        b, part = _derive_batch(pa.RecordBatch.from_pylist([], schema=reader.schema), rules)
        batches, parts = [b], [part]
    return pa.Table.from_batches(batches), _concat_parts(parts)


def _derive_batch(batch: pa.RecordBatch, rules: BarcodeRules) -> tuple[pa.RecordBatch, dict[str, Any]]:
    """One block: the barcode and coordinate rules, the block with its barcode
    normalised (source text kept where it changed), and the derived columns."""
    bc = barcode_checks(batch.column("dna_barcode"), rules)
    cc = coordinate_checks(batch.column("coord-lat"), batch.column("coord-lon"))
    cols = {name: batch.column(name) for name in batch.schema.names}
    cols["dna_barcode"] = bc.normalised.combine_chunks()
    cols["_raw"], cols["_tail"] = _changed_text(batch.column("dna_barcode"), bc.changed, bc.trimmed_only)
    part = {  # int64/float64: GX's "between" is vectorised only for those dtypes (per value in Python else)
        "barcode_length": bc.length.astype(np.int64), "n_fraction": bc.n_fraction,
        "barcode_charset": bc.charset, "lat": cc.lat, "lon": cc.lon, "lat_given": cc.lat_given,
        "lon_given": cc.lon_given, "lat_unparsed": cc.lat_unparsed, "lon_unparsed": cc.lon_unparsed,
        "masks": {
            "dna_barcode.alphabet": bc.problems["alphabet"], "dna_barcode.length": bc.problems["length"],
            "dna_barcode.n_fraction": bc.problems["n_fraction"],
            "coord-lat.numeric": cc.problems[("coord-lat", "numeric")],
            "coord-lon.numeric": cc.problems[("coord-lon", "numeric")],
            "coord-lat.range": cc.problems[("coord-lat", "range")],
            "coord-lon.range": cc.problems[("coord-lon", "range")],
            "coordinates.both_or_neither": cc.problems[("coord-lat", "both_or_neither")]
            | cc.problems[("coord-lon", "both_or_neither")],
        },
    }
    return pa.RecordBatch.from_pydict(cols), part


def _changed_text(raw: pa.Array, changed: np.ndarray, trimmed_only: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """(whole source text, trimmed tail) per record, null where unneeded."""
    n = len(raw)
    null = pa.nulls(n, pa.string())
    tails = null
    if trimmed_only.any():
        longest = pc.max(pc.binary_length(raw)).as_py()  # an explicit stop: Arrow mis-sizes an open one
        cut = pc.binary_slice(raw.cast(pa.binary()), MAX_NUCLEOTIDES, longest).cast(pa.string())
        tails = pc.if_else(pa.array(trimmed_only), cut, null)
    other = changed & ~trimmed_only
    wholes = pc.if_else(pa.array(other), raw, null) if other.any() else null
    return wholes, tails


def _concat_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The blocks' derived columns end to end (numpy arrays, Arrow chunked arrays)."""
    out: dict[str, Any] = {}
    for k, v in parts[0].items():
        if k == "masks":
            out[k] = {m: np.concatenate([p[k][m] for p in parts]) for m in v}
        elif isinstance(v, pa.Array):
            out[k] = pa.chunked_array([p[k] for p in parts], type=v.type)
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    return out


def id_and_split_rules(table: pa.Table, d: dict[str, Any]) -> None:
    """Masks for the whole-file rules (processid present and unique, split known)."""
    # processids as dictionary codes (equal ids, equal codes): GX fingerprints
    # its batch by hashing every value, 4 s for 5M strings, 0.03 s for codes.
    codes = processid_codes(table.column("processid"))
    d["processid_code"] = codes
    d["masks"]["processid.present"] = codes < 0
    counts = np.bincount(codes[codes >= 0], minlength=1)
    d["masks"]["processid.unique"] = (codes >= 0) & (counts[np.maximum(codes, 0)] > 1)
    d["split"] = pc.fill_null(table.column("split"), "")  # a missing split is judged as ""
    d["masks"]["split.known"] = ~pc.is_in(d["split"], pa.array(SPLITS)).to_numpy(zero_copy_only=False)


def processid_codes(pid: pa.ChunkedArray) -> np.ndarray:
    """One int64 code per distinct processid (-1 where missing), in file order."""
    enc = pc.dictionary_encode(pid)
    parts = [c.indices.to_numpy(zero_copy_only=False) if c.null_count == 0 else
             c.indices.fill_null(-1).to_numpy(zero_copy_only=False) for c in enc.chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def derived_frame(d: dict[str, Any], with_images: bool) -> pd.DataFrame:
    """What GX judges: one row per record, the quantities the rules read."""
    codes = d["processid_code"]
    frame = pd.DataFrame({
        "processid_code": pd.arrays.IntegerArray(np.maximum(codes, 0), codes < 0),
        "split": d["split"].to_pandas(),
        "barcode_charset": d["barcode_charset"].to_pandas(), "barcode_length": d["barcode_length"],
        "n_fraction": d["n_fraction"], "coord-lat": d["lat"], "coord-lon": d["lon"],
        "coord-lat_unparsed": d["lat_unparsed"].to_pandas(), "coord-lon_unparsed": d["lon_unparsed"].to_pandas(),
        "coord-lat_given": d["lat_given"], "coord-lon_given": d["lon_given"],
    })
    if with_images:
        frame["image"] = pd.Series(d["image"], dtype="str")
    return frame


def check_images(root: Path, table: pa.Table, progress: bool) -> np.ndarray:
    """Per record: "ok", "missing", "corrupt", or None where no image is expected
    (no processid, or a split outside the official ones)."""
    from tqdm.auto import tqdm

    pids = table.column("processid").to_pylist()
    splits = table.column("split").to_pylist()
    chunks = table.column("chunk").to_pylist() if "chunk" in table.column_names else [None] * len(pids)
    todo = [i for i, (p, s) in enumerate(zip(pids, splits)) if p is not None and s in SPLITS]
    paths = [root / record_image_relpath(pids[i], splits[i], chunks[i]) for i in todo]
    status = np.full(len(pids), None, dtype=object)
    # Threads: file reads and JPEG decoding release the GIL.
    with ThreadPoolExecutor(max_workers=4) as pool:
        it = pool.map(image_status, paths, chunksize=64)
        status[todo] = list(tqdm(it, total=len(paths), desc="images", unit="img", disable=not progress,
                                 mininterval=2.0))
    return status


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


def _raw_barcode(t: pa.Table) -> pa.ChunkedArray:
    """The source text where normalisation changed it, else null."""
    return pc.coalesce(t.column("_raw"), pc.binary_join_element_wise(t.column("dna_barcode"), t.column("_tail"), ""))


def _source_barcode(t: pa.Table) -> pa.ChunkedArray:
    return pc.coalesce(_raw_barcode(t), t.column("dna_barcode"))


def _timed(f: Any, *args: Any) -> float:
    t = time.perf_counter()
    f(*args)
    return round(time.perf_counter() - t, 2)


def write_outputs(table: pa.Table, d: dict[str, Any], rules: list[Rule], rejected: np.ndarray,
                  has_place: np.ndarray, out: Path) -> None:
    write_valid(table, d, ~rejected, has_place, out / "valid.parquet")
    write_quarantine(table, d, rules, np.flatnonzero(rejected), out / "quarantine.parquet")


def write_valid(table: pa.Table, d: dict[str, Any], keep: np.ndarray, has_place: np.ndarray, path: Path) -> None:
    """Kept records, slice by slice (no second copy of the table in memory):
    official columns (``dna_barcode`` normalised, coordinates float64), then
    ``dna_barcode_raw`` and ``has_place``."""
    writer = None
    for start in range(0, max(table.num_rows, 1), _SLICE):
        sl = slice(start, start + _SLICE)
        k = keep[sl]
        t = table.slice(start, _SLICE).filter(pa.array(k))
        for col, key in (("coord-lat", "lat"), ("coord-lon", "lon")):
            vals = d[key][sl][k]
            t = t.set_column(t.schema.get_field_index(col), col, pa.array(vals, pa.float64(), mask=np.isnan(vals)))
        t = t.append_column("dna_barcode_raw", _raw_barcode(t)).drop_columns(["_raw", "_tail"])
        t = _official_integers(t).append_column("has_place", pa.array(has_place[sl][k]))
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema, compression="snappy", write_statistics=_stats(t))
        writer.write_table(t)
    if writer is not None:
        writer.close()


def write_quarantine(table: pa.Table, d: dict[str, Any], rules: list[Rule], rows: np.ndarray, path: Path) -> None:
    """One row per rejected record: its source fields unchanged (coordinates as
    text, the barcode as read), its normalised barcode, and every reason."""
    take = pa.array(rows, pa.int64())
    chosen = np.zeros(table.num_rows, bool)
    chosen[rows] = True
    t = table.filter(pa.array(chosen))  # filter, not take: take would join >2 GB of strings into one array
    reasons: list[list[dict[str, Any]]] = [[] for _ in rows]
    for r in rules:
        local = np.flatnonzero(d["masks"][r.key][rows])
        for j, value, column in zip(local.tolist(), *_offending(r.key, rows[local], local, d, t)):
            reasons[j].append({"rule": r.key, "column": column, "expectation": r.expectation.expectation_type,
                               "value": value})
    t = t.set_column(t.schema.get_field_index("dna_barcode"), "dna_barcode", _source_barcode(t))
    t = t.drop_columns(["_raw", "_tail"])
    t = t.append_column("dna_barcode_normalised", table.column("dna_barcode").filter(pa.array(chosen)))
    t = t.add_column(0, "row", take)  # record number in the source file, from 0
    t = t.append_column("rules", pa.array([[x["rule"] for x in rs] for rs in reasons], pa.list_(pa.string())))
    t = t.append_column("reasons", pa.array([json.dumps(rs) for rs in reasons], pa.string()))
    pq.write_table(t, path, compression="snappy")


_AXIS = {"coord-lat": "lat", "coord-lon": "lon"}


def _offending(key: str, idx: np.ndarray, local: np.ndarray, d: dict[str, Any], t: pa.Table) -> tuple[list, list]:
    """(offending value, column) for the records failing rule ``key``: ``idx``
    index the whole file (and ``d``), ``local`` the quarantine table ``t``."""
    if key == "coordinates.both_or_neither":  # reported on the absent column
        lat_given = d["lat_given"][idx]
        return [None] * len(idx), np.where(lat_given, "coord-lon", "coord-lat").tolist()
    column = key.split(".")[0]
    if column in ("processid", "split"):
        vals = t.column(column).take(pa.array(local, pa.int64())).to_pylist()
    elif key == "dna_barcode.alphabet":  # the characters outside ACGTN
        sets = d["barcode_charset"].take(pa.array(idx, pa.int64())).to_pylist()
        vals = ["".join(c for c in s if c not in "ACGTN") for s in sets]
    elif key == "dna_barcode.length":
        vals = d["barcode_length"][idx].tolist()
    elif key == "dna_barcode.n_fraction":
        vals = [round(x, 4) for x in d["n_fraction"][idx].tolist()]
    elif key.endswith(".numeric"):
        vals = d[_AXIS[column] + "_unparsed"].take(pa.array(idx, pa.int64())).to_pylist()
    elif key.endswith(".range"):
        vals = d[_AXIS[column]][idx].tolist()
    else:  # image.*: the path that is missing or does not decode
        sub = t.take(pa.array(local, pa.int64()))
        chunks = sub.column("chunk").to_pylist() if "chunk" in sub.column_names else [None] * len(local)
        vals = [str(record_image_relpath(p, s, c)) for p, s, c in
                zip(sub.column("processid").to_pylist(), sub.column("split").to_pylist(), chunks)]
    return vals, [column] * len(vals)


def _official_integers(t: pa.Table) -> pa.Table:
    """Integer columns (read as float64) back to the official integer types."""
    for col, typ in (("inferred_ranks", pa.uint8()), ("index_bioscan_1M_insect", pa.int64())):
        if col in t.column_names:
            try:
                t = t.set_column(t.schema.get_field_index(col), col, pc.cast(t.column(col), typ))
            except pa.ArrowInvalid as e:
                raise ValueError(f"column {col!r}: {e}") from None
    return t


def _stats(t: pa.Table) -> list[str]:
    """Columns that get statistics: not the barcodes (min/max of 660-char strings cost time, tell nothing)."""
    return [c for c in t.column_names if c not in ("dna_barcode", "dna_barcode_raw")]


def _summary(root: Path, out: Path, cfg: ValidateConfig, rules: list[Rule], suite: SuiteResult, n: int,
             rejected: np.ndarray, has_place: np.ndarray, timings: dict[str, float],
             images_checked: int) -> dict[str, Any]:
    per_rule = {r.key: {"column": r.column, **suite.per_rule[r.key]} for r in rules}
    worst = sorted((k for k, v in per_rule.items() if v["unexpected_count"]),
                   key=lambda k: -per_rule[k]["unexpected_count"])
    quarantined = int(rejected.sum())
    share = quarantined / n if n else 0.0
    return {
        "root": str(root), "out": str(out), "records_in": n, "valid": n - quarantined, "quarantined": quarantined,
        "reject_fraction": share, "max_reject_fraction": cfg.max_reject_fraction,
        "passed": share <= cfg.max_reject_fraction,
        "valid_without_place": int((~has_place & ~rejected).sum()), "images_checked": images_checked,
        "expectations": per_rule, "worst_expectations": worst[:3],
        "gx_success": suite.success, "gx_statistics": suite.statistics,
        "gx_runs_on": "one row per record: processid (as a dictionary code), split, normalised barcode "
                      "length, N fraction and character set, coordinates as numbers, unparsed coordinate "
                      "text, which coordinates are given" + (", image status" if cfg.check_images else ""),
        "data_docs": "data_docs/index.html", "config": dataclasses.asdict(cfg), "timings_s": timings,
    }
