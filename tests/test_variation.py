from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from g2p.variation import latitude_sweep, mutate_barcode, mutation_series

BARCODE = "ACGT" * 160  # 640 nt


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_mutation_changes_exactly_the_requested_share(rate: float, seed: int) -> None:
    out = mutate_barcode(BARCODE, rate, seed)
    assert len(out) == len(BARCODE)
    diffs = sum(a != b for a, b in zip(out, BARCODE))
    assert diffs == round(rate * len(BARCODE))
    assert set(out) <= set("ACGT")
    assert mutate_barcode(BARCODE, rate, seed) == out  # seeded


def test_mutation_series_and_rate_bounds() -> None:
    series = mutation_series(BARCODE, [0.0, 0.1, 0.5])
    assert series[0] == BARCODE
    assert series[1] != series[2]
    with pytest.raises(ValueError, match="rate"):
        mutate_barcode(BARCODE, 1.5)


def test_latitude_sweep() -> None:
    assert latitude_sweep(-60, 60, 5) == [-60.0, -30.0, 0.0, 30.0, 60.0]
    assert latitude_sweep(-100, 100, 3) == [-90.0, 0.0, 90.0]
