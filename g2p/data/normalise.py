"""What a valid barcode and a valid place are: one home for the rules.

Great Expectations (``pipelines/validation.py``), the tokenizer and the HTTP
schemas of the servers all call these functions, so they can never disagree.

Barcode normalisation, in order:

1. strip surrounding whitespace and upper-case (``acgt`` -> ``ACGT``);
2. ``U`` -> ``T`` (an RNA spelling of the same base);
3. drop alignment gap characters ``-``, ``.``, ``~`` and inner whitespace;
4. map IUPAC ambiguity codes (``R Y S W K M B D H V``) and ``?`` to ``N``;
5. trim to :data:`MAX_NUCLEOTIDES` (660): BIOSCAN-5M's reads past 660 nt are
   likely inaccurate, and its loaders truncate there too.

After normalisation a barcode is valid when its alphabet is ``ACGTN``, its
length is within bounds (``ValidateConfig.min_length`` .. 660) and its share
of ``N`` is at most ``ValidateConfig.max_n_fraction``.

Coordinates are valid when both are numbers in range (latitude in [-90, 90],
longitude in [-180, 180]) or both are absent; a record with no place is kept
and marked (the conditioner has an "unknown place" token for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_NUCLEOTIDES = 660
ALPHABET = frozenset("ACGTN")
GAP_CHARS = "-.~ \t\r\n"
AMBIGUITY_CODES = "RYSWKMBDHV?"

# str.translate table: U->T, ambiguity->N, gaps removed. Applied after upper().
_TRANSLATE = str.maketrans({"U": "T", **{c: "N" for c in AMBIGUITY_CODES}, **{c: None for c in GAP_CHARS}})


def normalise_barcode(seq: str) -> str:
    """Apply the documented normalisation (steps 1-5 above) to one barcode."""
    return seq.strip().upper().translate(_TRANSLATE)[:MAX_NUCLEOTIDES]


@dataclass(frozen=True)
class BarcodeRules:
    min_length: int = 200
    max_length: int = MAX_NUCLEOTIDES
    max_n_fraction: float = 0.1


def barcode_problems(normalised: str, rules: BarcodeRules = BarcodeRules()) -> list[tuple[str, str]]:
    """Reasons a *normalised* barcode is invalid, as (expectation, detail) pairs; empty if valid."""
    problems: list[tuple[str, str]] = []
    bad = sorted(set(normalised) - ALPHABET)
    if bad:
        problems.append(("alphabet", f"characters {''.join(bad)!r} outside ACGTN"))
    n = len(normalised)
    if n < rules.min_length or n > rules.max_length:
        problems.append(("length", f"length {n} outside [{rules.min_length}, {rules.max_length}]"))
    if n and normalised.count("N") / n > rules.max_n_fraction:
        problems.append(("n_fraction", f"N fraction {normalised.count('N') / n:.3f} > {rules.max_n_fraction}"))
    return problems


def check_barcode(seq: str, rules: BarcodeRules = BarcodeRules(), field: str = "barcode") -> str:
    """Normalise and validate one barcode; raise ``ValueError`` naming the field and value."""
    if not isinstance(seq, str):
        raise ValueError(f"{field}: expected a string, got {seq!r}")
    norm = normalise_barcode(seq)
    problems = barcode_problems(norm, rules)
    if problems:
        shown = seq if len(seq) <= 40 else seq[:37] + "..."
        raise ValueError(f"{field}={shown!r}: " + "; ".join(d for _, d in problems))
    return norm


def coordinate_problems(lat: object, lon: object) -> list[tuple[str, str, str]]:
    """Reasons a (lat, lon) pair is invalid, as (column, expectation, detail); empty if valid.

    ``None``, NaN or a blank string in both is valid (unknown place). Each rule
    is judged on its own, so a record shows *every* problem at once (a
    latitude of 95 with no longitude is both out of range and unpaired): a
    non-number is ``numeric``; a value given (even a non-number) where the
    other is absent is ``both_or_neither`` on the absent column; a number out
    of bounds is ``range``.
    """
    lat_v, lat_bad = _as_float(lat)
    lon_v, lon_bad = _as_float(lon)
    problems: list[tuple[str, str, str]] = []
    if lat_bad:
        problems.append(("coord-lat", "numeric", f"{lat!r} is not a number"))
    if lon_bad:
        problems.append(("coord-lon", "numeric", f"{lon!r} is not a number"))
    lat_given, lon_given = lat_bad or lat_v is not None, lon_bad or lon_v is not None
    if lat_given != lon_given:
        missing = "coord-lon" if lat_given else "coord-lat"
        problems.append((missing, "both_or_neither", "one coordinate present, the other absent"))
    if lat_v is not None and not -90.0 <= lat_v <= 90.0:
        problems.append(("coord-lat", "range", f"latitude {lat_v} outside [-90, 90]"))
    if lon_v is not None and not -180.0 <= lon_v <= 180.0:
        problems.append(("coord-lon", "range", f"longitude {lon_v} outside [-180, 180]"))
    return problems


def check_coordinates(lat: object, lon: object) -> tuple[float | None, float | None]:
    """Validate one place; raise ``ValueError`` naming the field and value."""
    problems = coordinate_problems(lat, lon)
    if problems:
        col, _, detail = problems[0]
        field = "latitude" if col == "coord-lat" else "longitude"
        raise ValueError(f"{field}: {detail}")
    return _as_float(lat)[0], _as_float(lon)[0]


def _as_float(v: object) -> tuple[float | None, bool]:
    """(value, is_bad): None/NaN/'' are absent (not bad); non-numbers are bad."""
    if v is None:
        return None, False
    if isinstance(v, str):
        if v.strip() == "":
            return None, False
        try:
            v = float(v)
        except ValueError:
            return None, True
    if isinstance(v, bool):
        return None, True
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, True
    if math.isnan(f):
        return None, False
    if math.isinf(f):
        return None, True
    return f, False


# ----------------------------------------------------------------------------
# The same rules over whole columns
# ----------------------------------------------------------------------------
# Why: validation judges BIOSCAN-5M's 5 million records, where one Python call
# per record costs minutes. These functions give exactly the per-record
# results above (a hypothesis test compares them): the common case, a barcode
# already made only of ACGTN or a plain decimal coordinate, is judged with
# Arrow and numpy over the raw bytes; anything unusual (lower case, gaps,
# IUPAC codes, non-ASCII text, odd number syntax) goes through the scalar
# functions above, so the two can never drift apart.

# One byte class per bit, in sorted order so a row's bits spell its character
# set: A C G N T, then "anything else".
_CLASS_BITS = {ord(c): 1 << i for i, c in enumerate("ACGNT")}
_FOREIGN = 32
_BYTE_CLASS = bytes(_CLASS_BITS.get(b, _FOREIGN) for b in range(256))
_CHARSETS = tuple("".join(c for i, c in enumerate("ACGNT") if code >> i & 1) for code in range(32))
_ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.strip() removes from ASCII text
_DECIMAL = r"^-?[0-9]{1,3}(\.[0-9]{1,15})?$"  # read identically by Arrow and float()


@dataclass(frozen=True)
class BarcodeChecks:
    """A column of raw barcodes, normalised and judged (arrays are (n,))."""

    normalised: Any  # pa.ChunkedArray of str; null where the input is missing
    changed: Any  # bool: normalisation changed the text
    trimmed_only: Any  # bool: ... only by the trim to 660 (normalised == raw[:660])
    length: Any  # int64: nucleotides after normalisation (0 if missing)
    n_fraction: Any  # float64: share of N (NaN where the length is 0)
    charset: Any  # pa.Array of str: distinct characters, sorted (null where empty)
    problems: dict[str, Any]  # expectation -> bool mask; names as barcode_problems


@dataclass(frozen=True)
class CoordinateChecks:
    """A column pair of raw coordinates, read and judged (arrays are (n,))."""

    lat: Any  # float64; NaN where absent or not a number
    lon: Any
    lat_given: Any  # bool: a value was given (a number or not)
    lon_given: Any
    lat_unparsed: Any  # pa.Array of str: the raw text where it is not a number, else null
    lon_unparsed: Any
    problems: dict[tuple[str, str], Any]  # (column, expectation) -> bool mask; as coordinate_problems


def normalise_barcodes(values: Any) -> Any:
    """:func:`normalise_barcode` over a column; a pandas Series in gives a Series
    (same index, Arrow-backed strings) out, anything else a ``pa.ChunkedArray``.
    Missing values stay missing."""
    out = barcode_checks(values).normalised
    if _is_series(values):
        series = out.to_pandas()
        series.index, series.name = values.index, values.name
        return series
    return out


def barcode_checks(values: Any, rules: BarcodeRules = BarcodeRules()) -> BarcodeChecks:
    """Normalise raw barcodes and judge them: per record, the same answers as
    ``barcode_problems(normalise_barcode(s), rules)`` (a missing barcode is
    judged as the empty string)."""
    import numpy as np
    import pyarrow as pa

    chunks = [_normalise_chunk(c) for c in _string_chunks(values)]
    if not chunks:
        chunks = [_normalise_chunk(pa.array([], pa.string()))]
    normalised = pa.chunked_array([c[0] for c in chunks], type=chunks[0][0].type)
    cat = lambda k: np.concatenate([c[k] for c in chunks])  # noqa: E731
    changed, trimmed_only, bits, n_count, length, foreign_sets = (cat(k) for k in range(1, 7))
    with np.errstate(invalid="ignore", divide="ignore"):
        n_fraction = np.where(length > 0, n_count / np.maximum(length, 1), np.nan)
    # Character sets as a dictionary column: 32 ACGTN combinations plus the rare
    # sets holding other characters (no Python string per record).
    foreign = (bits & _FOREIGN) != 0
    codes = (bits & 31).astype(np.int32)
    extra = {t: 32 + k for k, t in enumerate(dict.fromkeys(foreign_sets[foreign].tolist()))}
    codes[foreign] = [extra[t] for t in foreign_sets[foreign].tolist()]
    charset = pa.DictionaryArray.from_arrays(
        pa.array(codes, mask=length == 0), pa.array(list(_CHARSETS) + list(extra), pa.string())
    ).cast(pa.string())
    problems = {
        "alphabet": foreign,
        "length": (length < rules.min_length) | (length > rules.max_length),
        "n_fraction": (length > 0) & (n_fraction > rules.max_n_fraction),
    }
    return BarcodeChecks(normalised, changed, trimmed_only, length, n_fraction, charset, problems)


def coordinate_checks(lat: Any, lon: Any) -> CoordinateChecks:
    """Read and judge raw coordinates: per record, the same answers as
    :func:`coordinate_problems` (strings, numbers or a mix)."""
    import numpy as np

    la, la_given, la_bad, la_raw = _read_coordinates(lat)
    lo, lo_given, lo_bad, lo_raw = _read_coordinates(lon)
    with np.errstate(invalid="ignore"):
        problems = {
            ("coord-lat", "numeric"): la_bad,
            ("coord-lon", "numeric"): lo_bad,
            ("coord-lat", "both_or_neither"): lo_given & ~la_given,
            ("coord-lon", "both_or_neither"): la_given & ~lo_given,
            ("coord-lat", "range"): (la < -90.0) | (la > 90.0),
            ("coord-lon", "range"): (lo < -180.0) | (lo > 180.0),
        }
    return CoordinateChecks(la, lo, la_given, lo_given, la_raw, lo_raw, problems)


# -- helpers -------------------------------------------------------------------


def _is_series(values: Any) -> bool:
    return type(values).__name__ == "Series" and hasattr(values, "index")


def _string_chunks(values: Any) -> list[Any]:
    """The values as a list of Arrow string arrays (a Series, Arrow data or a list)."""
    import pyarrow as pa

    if _is_series(values):
        values = pa.array(values, from_pandas=True)
    elif not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(list(values), pa.string())
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    return list(values.chunks) if isinstance(values, pa.ChunkedArray) else [values]


def _profile(arr: Any, limit: int | None = MAX_NUCLEOTIDES) -> tuple[Any, Any, Any]:
    """Per string, from the raw Arrow buffers in one pass (nulls: 0, 0, False):
    the OR of the byte classes (:data:`_CLASS_BITS`) and the number of ``N``
    bytes within its first ``limit`` bytes (None: all), and whether any byte at all is
    outside ACGTN. For a string of only ACGTN that is the profile of its trim."""
    import numpy as np
    import pyarrow as pa

    import pyarrow.compute as pc

    n = len(arr)
    off_type = np.int64 if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], off_type)[arr.offset: arr.offset + n + 1].astype(np.int64)
    data_buf = arr.buffers()[2]
    lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    # The bytes plus one sentinel, so every cut below indexes inside the array.
    data = bytearray(hi - lo + 1)
    if data_buf is not None and hi > lo:
        data[: hi - lo] = memoryview(data_buf)[lo:hi]
    starts, lengths = offsets[:-1] - lo, np.diff(offsets)
    limit = int(lengths.max(initial=0)) if limit is None else limit
    mids = starts + np.minimum(lengths, limit)
    cls = np.frombuffer(data.translate(_BYTE_CLASS), np.uint8)
    cls[-1] = 0  # the sentinel is no character
    both = np.bitwise_or.reduceat(cls, np.stack([starts, mids], 1).ravel()) if n else np.zeros(0, np.uint8)
    # reduceat over an empty cut gives the byte at the cut: mask those.
    head = np.where(lengths > 0, both[0::2], 0).astype(np.uint8)
    tail = np.where(lengths > limit, both[1::2], 0).astype(np.uint8)
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        head[~valid], tail[~valid] = 0, 0
    # N's are counted only in the (few) strings that hold one.
    n_count = np.zeros(n, np.int64)
    with_n = np.flatnonzero(head & _CLASS_BITS[ord("N")])
    if len(with_n):
        sub = pc.binary_slice(arr.take(pa.array(with_n)).cast(pa.binary()), 0, limit)
        n_count[with_n] = pc.count_substring(sub, "N").to_numpy(zero_copy_only=False)
    return head, n_count, ((head | tail) & _FOREIGN) != 0


def _normalise_chunk(arr: Any) -> tuple[Any, ...]:
    """(normalised, changed, trimmed_only, bits, n_count, length, foreign charsets) for one Arrow array."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arr.cast(pa.string()) if not pa.types.is_large_string(arr.type) else arr
    n = len(arr)
    bits, n_count, odd = _profile(arr)
    length = pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    foreign_sets = np.full(n, None, dtype=object)
    # Only ACGTN: normal, or normal once trimmed (bytes are characters; the
    # profile above is already the trim's). Anything else: the whole rule.
    trimmed = ~odd & (length > MAX_NUCLEOTIDES)
    changed = trimmed.copy()
    if not trimmed.any() and not odd.any():
        return arr, changed, trimmed, bits, n_count, length, foreign_sets
    out = arr
    if trimmed.any():
        out = pc.binary_slice(arr.cast(pa.binary()), 0, MAX_NUCLEOTIDES)  # odd rows replaced below
        length[trimmed] = MAX_NUCLEOTIDES
    rows = np.flatnonzero(odd)
    if len(rows):
        sub = arr.take(pa.array(rows))
        fixed = _normalise_text(sub)
        out = pc.replace_with_mask(out, _mask(n, rows), fixed.cast(out.type))
        changed[rows] = pc.not_equal(fixed, sub).to_numpy(zero_copy_only=False)
        bits[rows], n_count[rows], _ = _profile(fixed, None)
        length[rows] = pc.utf8_length(fixed).to_numpy(zero_copy_only=False)
        still = np.flatnonzero((bits[rows] & _FOREIGN) != 0)
        if len(still):
            foreign_sets[rows[still]] = ["".join(sorted(set(t))) for t in fixed.take(pa.array(still)).to_pylist()]
    return out.cast(arr.type), changed, trimmed, bits, n_count, length, foreign_sets


def _mask(n: int, idx: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    m = np.zeros(n, bool)
    m[idx] = True
    return pa.array(m)


def _normalise_text(sub: Any) -> Any:
    """The whole rule (steps 1-5) on strings that hold more than ACGTN: Arrow
    kernels for ASCII text, :func:`normalise_barcode` itself for the rest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    fixed = pc.utf8_trim(sub, characters=_ASCII_SPACE)
    fixed = pc.ascii_upper(fixed)
    fixed = pc.replace_substring_regex(fixed, r"[\-.~ \t\r\n]", "")
    fixed = pc.replace_substring_regex(fixed, "[RYSWKMBDHV?]", "N")
    fixed = pc.replace_substring(fixed, "U", "T")
    fixed = pc.utf8_slice_codeunits(fixed, 0, MAX_NUCLEOTIDES)
    ascii_ok = pc.string_is_ascii(sub).to_numpy(zero_copy_only=False)
    if not ascii_ok.all():  # str.upper()/strip() on Unicode text: the scalar rule itself
        texts, raw = fixed.to_pylist(), sub.to_pylist()
        for i in np.flatnonzero(~ascii_ok):
            texts[i] = normalise_barcode(raw[i])
        fixed = pa.array(texts, sub.type)
    return fixed.cast(sub.type)


def _coordinate_array(values: Any) -> Any:
    """Arrow view of a coordinate column (float64 or string), or None for a mix."""
    import numpy as np
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        t = values.type
        if pa.types.is_floating(t) or pa.types.is_integer(t):
            return values.cast(pa.float64())
        textual = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
        return values.cast(pa.string()) if textual else None
    if not _is_series(values) or values.dtype.kind == "b":
        return None  # a list, or booleans: read one by one
    if values.dtype.kind in "fiu":
        return pa.array(values.to_numpy(dtype=np.float64, na_value=np.nan))
    try:  # strings (and missing values); a mix of types raises and is read one by one
        return pa.array(values, pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _read_coordinates(values: Any) -> tuple[Any, Any, Any, Any]:
    """(value, given, bad, unparsed text) per record, as :func:`_as_float` reads each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _coordinate_array(values)
    n = len(values)
    raw_text = np.full(n, None, dtype=object)
    if arr is not None and pa.types.is_floating(arr.type):
        v = arr.fill_null(np.nan).to_numpy(zero_copy_only=False).copy()
        bad = np.isinf(v)
        raw_text[bad] = [repr(float(x)) for x in v[bad]]
        v[bad] = np.nan
        return v, ~np.isnan(v) | bad, bad, pa.array(raw_text, pa.string())
    v, given, bad = np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, bool)
    if arr is not None:  # strings: plain decimals in Arrow, the rest one by one
        fast = pc.match_substring_regex(arr, _DECIMAL).fill_null(False).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(fast)
        v[idx] = pc.cast(arr.take(pa.array(idx)), pa.float64()).to_numpy(zero_copy_only=False)
        given[idx] = True
        slow = np.flatnonzero(~fast & arr.is_valid().to_numpy(zero_copy_only=False))
        items = arr.take(pa.array(slow)).to_pylist()
    else:
        slow = np.arange(n)
        items = values.tolist() if hasattr(values, "tolist") else list(values)
    for i, raw in zip(slow.tolist(), items):
        f, is_bad = _as_float(raw)
        if is_bad:
            bad[i] = given[i] = True
            raw_text[i] = raw if isinstance(raw, str) else repr(raw)
        elif f is not None:
            v[i], given[i] = f, True
    return v, given, bad, pa.array(raw_text, pa.string())
