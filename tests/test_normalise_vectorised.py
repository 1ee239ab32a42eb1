"""The column-wise rules give exactly the per-record rules (g2p.data.normalise).

Why property tests: the vectorised code takes fast paths over raw bytes and
falls back to the scalar rule for anything unusual; the boundary between the
two is where they could disagree, so hypothesis throws mixed text at it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from g2p.data.normalise import (
    BarcodeRules,
    _as_float,
    barcode_checks,
    barcode_problems,
    coordinate_checks,
    coordinate_problems,
    normalise_barcode,
    normalise_barcodes,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Barcode-like text: bases, lower case, IUPAC codes, gaps, odd whitespace, a
# few non-ASCII letters whose upper case changes length (ß -> SS).
_BARCODE_CHARS = "ACGTNacgtnUuRYSWKMBDHVryswkmbdhv?-.~ \t\r\n\x0b\x1cXZ1*éßǅ\u00a0"
_pieces = st.one_of(
    st.text(alphabet="ACGT", min_size=0, max_size=40),
    st.text(alphabet=_BARCODE_CHARS, min_size=0, max_size=6),
)
barcodes = st.one_of(
    st.lists(_pieces, max_size=8).map("".join),
    st.builds(lambda k, tail: "ACGT" * k + tail, st.integers(40, 180), st.text(alphabet=_BARCODE_CHARS, max_size=5)),
    st.text(max_size=30),
)
rules = st.builds(BarcodeRules, min_length=st.integers(0, 50), max_length=st.integers(5, 700),
                  max_n_fraction=st.floats(0, 1))


def _expected_barcode(s: str, r: BarcodeRules) -> tuple[str, set[str]]:
    norm = normalise_barcode(s)
    return norm, {name for name, _ in barcode_problems(norm, r)}


@SETTINGS
@given(st.lists(st.one_of(barcodes, st.none()), max_size=25), rules)
def test_barcode_checks_equal_scalar_rules(values: list[str | None], r: BarcodeRules) -> None:
    checks = barcode_checks(pa.array(values, pa.string()), r)
    got_norm = checks.normalised.to_pylist()
    charsets = checks.charset.to_pylist()
    for i, raw in enumerate(values):
        norm, names = _expected_barcode(raw or "", r)
        assert got_norm[i] == (None if raw is None else norm)
        assert {k for k, m in checks.problems.items() if m[i]} == names, (raw, norm)
        assert checks.length[i] == len(norm)
        assert charsets[i] == ("".join(sorted(set(norm))) or None)
        assert bool(checks.changed[i]) == (raw is not None and norm != raw)
        if checks.trimmed_only[i]:
            assert checks.changed[i] and len(raw) > 660 and norm == raw[:660]
        if norm:
            assert checks.n_fraction[i] == norm.count("N") / len(norm)


@SETTINGS
@given(st.lists(barcodes, max_size=15))
def test_normalise_barcodes_series_keeps_index(values: list[str]) -> None:
    s = pd.Series(values, index=np.arange(len(values)) * 3, name="dna_barcode", dtype="str")
    out = normalise_barcodes(s)
    assert list(out.index) == list(s.index) and out.name == "dna_barcode"
    assert out.tolist() == [normalise_barcode(v) for v in values]


def test_barcode_checks_across_chunks_and_slices() -> None:
    """Arrow chunks and sliced arrays (non-zero offsets) read the right bytes."""
    vals = ["acgt-", "ACGTNNNN", None, "ACGX", "", "ryACGT", "é" * 400, "A" * 659 + "é", "C" * 700,
            "ACGT" * 170 + "NNNN"] * 5  # multi-byte text, trims, an N only past 660
    arr = pa.array(vals, pa.string())
    chunked = pa.chunked_array([arr.slice(0, 7), arr.slice(7, 11), arr.slice(18)])
    a, b = barcode_checks(arr, BarcodeRules(min_length=1)), barcode_checks(chunked, BarcodeRules(min_length=1))
    assert a.normalised.to_pylist() == [None if v is None else normalise_barcode(v) for v in vals]
    assert a.normalised.to_pylist() == b.normalised.to_pylist()
    for k in a.problems:
        assert (a.problems[k] == b.problems[k]).all()
    assert (a.length == b.length).all() and a.charset.to_pylist() == b.charset.to_pylist()


# -- coordinates -----------------------------------------------------------------

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-400, 400))
_coord_text = st.one_of(
    st.from_regex(r"\A-?[0-9]{1,3}(\.[0-9]{1,15})?\Z"),  # the fast path
    _numbers.map(str),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "north", "1e2", " 12.5 ", "1_0", "+5", ".5", "٣"]),
    st.text(max_size=6),
)


def _expected_coords(lat: object, lon: object) -> set[tuple[str, str]]:
    return {(col, exp) for col, exp, _ in coordinate_problems(lat, lon)}


def _assert_coords_match(lat: list, lon: list, checks) -> None:
    for i, (a, b) in enumerate(zip(lat, lon)):
        got = {k for k, m in checks.problems.items() if m[i]}
        assert got == _expected_coords(a, b), (a, b)
        if not got:  # a valid place reads as the scalar rule reads it
            for want, have in ((_as_float(a)[0], checks.lat[i]), (_as_float(b)[0], checks.lon[i])):
                assert math.isnan(have) if want is None else have == want


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.none(), _coord_text), st.one_of(st.none(), _coord_text)), max_size=25))
def test_coordinate_checks_on_text_equal_scalar_rules(pairs: list[tuple[str | None, str | None]]) -> None:
    lat, lon = [p[0] for p in pairs], [p[1] for p in pairs]
    checks = coordinate_checks(pa.array(lat, pa.string()), pd.Series(lon, dtype="str"))
    _assert_coords_match(lat, lon, checks)


@SETTINGS
@given(st.lists(st.tuples(st.floats(), st.floats()), max_size=25))
def test_coordinate_checks_on_numbers_equal_scalar_rules(pairs: list[tuple[float, float]]) -> None:
    lat, lon = [p[0] for p in pairs], [p[1] for p in pairs]
    checks = coordinate_checks(pd.Series(lat, dtype="float64"), pa.array(lon, pa.float64()))
    _assert_coords_match(lat, lon, checks)


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.none(), _numbers, _coord_text, st.booleans()),
                          st.one_of(st.none(), _numbers, _coord_text)), max_size=20))
def test_coordinate_checks_on_mixed_objects_equal_scalar_rules(pairs: list[tuple[object, object]]) -> None:
    lat, lon = [p[0] for p in pairs], [p[1] for p in pairs]
    checks = coordinate_checks(pd.Series(lat, dtype=object), lon)
    _assert_coords_match(lat, lon, checks)


def test_coordinate_problems_reports_every_reason() -> None:
    assert _expected_coords(95, None) == {("coord-lat", "range"), ("coord-lon", "both_or_neither")}
    assert _expected_coords("north", "") == {("coord-lat", "numeric"), ("coord-lon", "both_or_neither")}
    assert _expected_coords(None, float("nan")) == set()
