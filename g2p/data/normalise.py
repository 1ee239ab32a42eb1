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

    ``None`` or NaN in both is valid (unknown place); in one only is not.
    """
    lat_v, lat_bad = _as_float(lat)
    lon_v, lon_bad = _as_float(lon)
    problems: list[tuple[str, str, str]] = []
    if lat_bad:
        problems.append(("coord-lat", "numeric", f"{lat!r} is not a number"))
    if lon_bad:
        problems.append(("coord-lon", "numeric", f"{lon!r} is not a number"))
    if problems:
        return problems
    if (lat_v is None) != (lon_v is None):
        missing = "coord-lat" if lat_v is None else "coord-lon"
        problems.append((missing, "both_or_neither", "one coordinate present, the other absent"))
        return problems
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
