"""``g2p data validate``: judge a root in the BIOSCAN-5M layout, keep or quarantine each record.

Flow (two passes over the CSV, Arrow throughout, nothing per record in
Python except rejected records):

1. a narrow pass reads only ``processid``, ``split`` and ``chunk``: the
   whole-file rules (processid present and unique, split known) and the
   image check, a Ray Data job (:mod:`pipelines.image_check`; all images, or
   ``image_sample`` of them);
2. the metadata streams in blocks (:mod:`pipelines.metadata_csv`); per block, :mod:`g2p.data.normalise`
   normalises barcodes and reads coordinates (the one home of those rules),
   giving derived per-record columns and a row mask per rule; with every mask
   of the block known, its kept records go to ``valid.parquet`` and its
   rejected ones (their source fields plus every reason as JSON) to
   ``quarantine.parquet``, row group by row group. Only the narrow derived
   columns outlive their block: at BIOSCAN-5M's 5.15 M records the whole
   table is 4 GB, 3.4 GB of it barcodes;
3. Great Expectations runs the suite (:mod:`pipelines.gx_suite`) over the
   derived frame and builds Data Docs; its unexpected count per expectation
   is what the summary reports, and must equal the rule's mask count (else
   the suite and the rules disagree, an error);
4. ``summary.json``; then fail if too many were rejected.

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
import resource
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from g2p.config import ValidateConfig
from g2p.data.bioscan import record_image_relpath
from g2p.data.layout import SPLITS
from g2p.data.normalise import MAX_NUCLEOTIDES, BarcodeRules, barcode_checks, coordinate_checks
from pipelines.gx_suite import Rule, SuiteResult, build_rules, run_suite
from pipelines.metadata_csv import MetadataStream, metadata_columns, read_ids
from pipelines.image_check import IMAGE_SAMPLE_SEED, check_images, eligible_rows, image_status  # noqa: F401

_SLICE = 1 << 15  # records per written row group (a writer buffers up to one: ~25 MB)


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
    clock, timings, peaks = time.perf_counter(), {}, {}

    def lap(name: str) -> None:  # seconds of each step, and this process's peak memory at its end
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = round(now - clock, 2), now
        peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux

    ids = read_ids(root, metadata_columns(root))  # checks the columns before anything slow
    n = ids.num_rows
    d: dict[str, Any] = {"masks": {}}
    id_and_split_rules(ids, d)
    lap("ids_and_splits")
    images = {"checked": 0, "expected": 0, "sample": False, "seed": None}
    if cfg.check_images:
        d["image"] = check_images(root, ids, progress, cfg.image_sample)
        d["masks"]["image.present"] = d["image"] == "missing"
        d["masks"]["image.decodable"] = d["image"] == "corrupt"
        expected = len(eligible_rows(ids))
        sampled = 0 < cfg.image_sample < expected
        images = {"checked": int(np.count_nonzero(d["image"] != None)),  # noqa: E711 -- elementwise
                  "expected": expected, "sample": sampled, "seed": IMAGE_SAMPLE_SEED if sampled else None}
        lap("images")
    del ids

    rules = build_rules(cfg)
    with MetadataStream(root) as stream:  # opened only now: nothing is read ahead meanwhile
        rejected, has_place = derive_and_write(stream, cfg, d, rules, out, n, progress)
    lap("read_rules_and_write")
    suite = run_suite(derived_frame(d, cfg.check_images), rules, out / "data_docs")
    lap("great_expectations")
    for r in rules:  # GX is the authority for counts; the masks give the rows
        gx_count, rule_count = suite.per_rule[r.key]["unexpected_count"], int(d["masks"][r.key].sum())
        if gx_count != rule_count:
            raise RuntimeError(f"rule {r.key}: GX counts {gx_count} unexpected, g2p.data.normalise "
                               f"{rule_count}: the suite and the rules disagree")

    summary = _summary(root, out, cfg, rules, suite, n, rejected, has_place, timings, peaks, images)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["reject_fraction"] > cfg.max_reject_fraction:
        worst = ", ".join(f"{k} ({summary['expectations'][k]['unexpected_count']})"
                          for k in summary["worst_expectations"])
        raise ValidationFailed(
            f"{summary['quarantined']} of {n} records rejected ({summary['reject_fraction']:.2%} > "
            f"max_reject_fraction {cfg.max_reject_fraction:.2%}); worst expectations: {worst}; "
            f"see {out / 'quarantine.parquet'} and {out / 'data_docs' / 'index.html'}", summary)
    return summary


def derive_and_write(reader: MetadataStream, cfg: ValidateConfig, d: dict[str, Any], rules: list[Rule],
                     out: Path, n: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The second pass: per block, the barcode and coordinate rules, then its kept and rejected records
    written out. Adds the blocks' derived columns and masks to ``d`` (whose whole-file masks, known
    already, it reads); returns (rejected, has_place) per record."""
    from tqdm.auto import tqdm

    whole_file = dict(d["masks"])
    parts, rejected, has_place, start = [], [], [], 0
    with _RowGroups(out / "valid.parquet", _stats) as valid, \
            _RowGroups(out / "quarantine.parquet", lambda t: True) as quarantine, \
            tqdm(total=n, desc="records", unit="rec", disable=not progress, mininterval=2.0) as bar:
        for t, part in derived_blocks(reader, BarcodeRules(cfg.min_length, cfg.max_length, cfg.max_n_fraction)):
            sl = slice(start, start + t.num_rows)
            masks = {**part["masks"], **{k: m[sl] for k, m in whole_file.items()}}
            rej = np.zeros(t.num_rows, bool)
            for r in rules:
                rej |= masks[r.key]
            place = part["lat_given"] & part["lon_given"]
            valid.write(valid_table(t, part, ~rej, place))
            quarantine.write(quarantine_table(t, part, masks, rules, np.flatnonzero(rej), start))
            parts.append(part)
            rejected.append(rej)
            has_place.append(place)
            start += t.num_rows
            bar.update(t.num_rows)
    if start != n:
        raise RuntimeError(f"the first pass read {n} records, the second {start}: "
                           "the metadata changed while validating")
    derived = _concat_parts(parts)
    d["masks"].update(derived.pop("masks"))
    d.update(derived)
    return np.concatenate(rejected), np.concatenate(has_place)


def derived_blocks(reader: MetadataStream, rules: BarcodeRules) -> Iterator[tuple[pa.Table, dict]]:
    """Each block of the stream, in order, with its barcode normalised (source text kept where it
    changed: ``_raw``, or, for a read merely trimmed past 660 nt, just the trimmed ``_tail``; a quarter
    of a synthetic 5M table is trimmed) and its derived columns and masks, keyed as the suite names them.
    A header-only file gives one empty block, so the outputs get their columns."""
    # Blocks are judged in worker threads while the reader parses the next
    # ones and the caller writes (Arrow and numpy release the GIL); a short
    # queue bounds memory.
    pending: deque[Future] = deque()
    seen = False
    with ThreadPoolExecutor(max_workers=2) as pool:
        for batch in reader:
            pending.append(pool.submit(_derive_batch, batch, rules))
            while len(pending) > 3 or (pending and pending[0].done()):
                seen = True
                yield pending.popleft().result()
        while pending:
            seen = True
            yield pending.popleft().result()
    if not seen:
        yield _derive_batch(pa.RecordBatch.from_pylist([], schema=reader.schema), rules)


def _derive_batch(batch: pa.RecordBatch, rules: BarcodeRules) -> tuple[pa.Table, dict[str, Any]]:
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
    return pa.table(cols), part


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
    """The blocks' derived columns end to end (numpy arrays, Arrow chunked arrays). Empties ``parts``
    key by key, so no more than one column is held twice while numpy copies."""
    out: dict[str, Any] = {}
    for k in list(parts[0]):
        vals = [p.pop(k) for p in parts]
        if k == "masks":
            out[k] = {m: np.concatenate([v.pop(m) for v in vals]) for m in list(vals[0])}
        elif isinstance(vals[0], pa.Array):
            out[k] = pa.chunked_array(vals, type=vals[0].type)
        else:
            out[k] = np.concatenate(vals)
        del vals
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


def _raw_barcode(t: pa.Table) -> pa.ChunkedArray:
    """The source text where normalisation changed it, else null."""
    return pc.coalesce(t.column("_raw"), pc.binary_join_element_wise(t.column("dna_barcode"), t.column("_tail"), ""))


def _source_barcode(t: pa.Table) -> pa.ChunkedArray:
    return pc.coalesce(_raw_barcode(t), t.column("dna_barcode"))


def valid_table(t: pa.Table, part: dict[str, Any], keep: np.ndarray, has_place: np.ndarray) -> pa.Table:
    """A block's kept records: official columns (``dna_barcode`` normalised,
    coordinates float64), then ``dna_barcode_raw`` and ``has_place``."""
    t = t.filter(pa.array(keep))
    for col, key in (("coord-lat", "lat"), ("coord-lon", "lon")):
        vals = part[key][keep]
        t = t.set_column(t.schema.get_field_index(col), col, pa.array(vals, pa.float64(), mask=np.isnan(vals)))
    t = t.append_column("dna_barcode_raw", _raw_barcode(t)).drop_columns(["_raw", "_tail"])
    return _official_integers(t).append_column("has_place", pa.array(has_place[keep]))


def quarantine_table(t: pa.Table, part: dict[str, Any], masks: dict[str, np.ndarray], rules: list[Rule],
                     rows: np.ndarray, start: int) -> pa.Table:
    """A block's rejected records (``rows`` of the block, which begins at record ``start``): source
    fields unchanged (coordinates as text, the barcode as read), the normalised barcode, every reason."""
    chosen = np.zeros(t.num_rows, bool)
    chosen[rows] = True
    q = t.filter(pa.array(chosen))
    reasons: list[list[dict[str, Any]]] = [[] for _ in rows]
    for r in rules:
        local = np.flatnonzero(masks[r.key][rows])
        for j, value, column in zip(local.tolist(), *_offending(r.key, rows[local], local, part, q)):
            reasons[j].append({"rule": r.key, "column": column, "expectation": r.expectation.expectation_type,
                               "value": value})
    q = q.set_column(q.schema.get_field_index("dna_barcode"), "dna_barcode", _source_barcode(q))
    q = q.drop_columns(["_raw", "_tail"])
    q = q.append_column("dna_barcode_normalised", t.column("dna_barcode").filter(pa.array(chosen)))
    q = q.add_column(0, "row", pa.array(start + rows, pa.int64()))  # record number in the source file, from 0
    q = q.append_column("rules", pa.array([[x["rule"] for x in rs] for rs in reasons], pa.list_(pa.string())))
    return q.append_column("reasons", pa.array([json.dumps(rs) for rs in reasons], pa.string()))


class _RowGroups:
    """A Parquet file written as tables come, in row groups of at least ``_SLICE`` records (the last
    may be smaller); with no rows at all, an empty file with the columns of the tables given."""

    def __init__(self, path: Path, stats: Any):
        self.path, self.stats = path, stats
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[pa.Table] = []
        self.rows = 0
        self.empty: pa.Table | None = None

    def write(self, t: pa.Table) -> None:
        if self.empty is None:
            self.empty = t.slice(0, 0)
        if t.num_rows:
            self.buffer.append(t)
            self.rows += t.num_rows
        if self.rows >= _SLICE:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        t = pa.concat_tables(self.buffer)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, t.schema, compression="snappy", write_statistics=self.stats(t))
        self.writer.write_table(t, row_group_size=t.num_rows)
        self.buffer, self.rows = [], 0

    def __enter__(self) -> "_RowGroups":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        elif self.empty is not None:
            pq.write_table(self.empty, self.path, compression="snappy", write_statistics=self.stats(self.empty))


_AXIS = {"coord-lat": "lat", "coord-lon": "lon"}


def _offending(key: str, idx: np.ndarray, local: np.ndarray, d: dict[str, Any], t: pa.Table) -> tuple[list, list]:
    """(offending value, column) for the records failing rule ``key``: ``idx``
    index the block (and its derived columns ``d``), ``local`` the quarantine table ``t``."""
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
             peaks: dict[str, float], images: dict[str, Any]) -> dict[str, Any]:
    per_rule = {r.key: {"column": r.column, **suite.per_rule[r.key]} for r in rules}
    worst = sorted((k for k, v in per_rule.items() if v["unexpected_count"]),
                   key=lambda k: -per_rule[k]["unexpected_count"])
    quarantined = int(rejected.sum())
    share = quarantined / n if n else 0.0
    return {
        "root": str(root), "out": str(out), "records_in": n, "valid": n - quarantined, "quarantined": quarantined,
        "reject_fraction": share, "max_reject_fraction": cfg.max_reject_fraction,
        "passed": share <= cfg.max_reject_fraction,
        "valid_without_place": int((~has_place & ~rejected).sum()), "images_checked": images["checked"],
        # expected: records that should have an image; sample: only some of them were checked (seed:
        # which), and the others are not judged on their images
        "images": images,
        "expectations": per_rule, "worst_expectations": worst[:3],
        "gx_success": suite.success, "gx_statistics": suite.statistics,
        "gx_runs_on": "one row per record: processid (as a dictionary code), split, normalised barcode "
                      "length, N fraction and character set, coordinates as numbers, unparsed coordinate "
                      "text, which coordinates are given" + (", image status" if cfg.check_images else ""),
        "data_docs": "data_docs/index.html", "config": dataclasses.asdict(cfg), "timings_s": timings,
        "peak_rss_gb": peaks,
    }
