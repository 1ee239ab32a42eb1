"""Variation helpers of the paper's section 4.4: mutate a barcode, sweep latitude.

Both are pure and seeded, so a figure made from them can be made again.
"""

from __future__ import annotations

import numpy as np

from g2p.data.normalise import normalise_barcode

_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)


def mutate_barcode(barcode: str, rate: float, seed: int = 0) -> str:
    """Substitute ``round(rate * L)`` distinct positions of the normalised barcode.

    Each chosen base becomes one of the three *other* bases (an ``N`` becomes
    any base), so the realised mutation rate is exactly ``rate`` up to rounding.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: {rate!r} outside [0, 1]")
    seq = np.frombuffer(normalise_barcode(barcode).encode(), dtype=np.uint8).copy()
    n = int(round(rate * len(seq)))
    if n == 0:
        return seq.tobytes().decode()
    rng = np.random.default_rng(seed)
    pos = rng.choice(len(seq), size=n, replace=False)
    for p, r in zip(pos, rng.integers(0, 3, size=n)):
        others = _BASES[_BASES != seq[p]]
        seq[p] = others[r % len(others)]
    return seq.tobytes().decode()


def mutation_series(barcode: str, rates: list[float], seed: int = 0) -> list[str]:
    """One mutant per rate; each rate uses its own sub-seed so adding a rate changes no other."""
    return [mutate_barcode(barcode, r, seed=seed * 1000 + i) for i, r in enumerate(rates)]


def latitude_sweep(start: float = -60.0, stop: float = 60.0, num: int = 7) -> list[float]:
    """Evenly spaced latitudes in [start, stop], clipped to [-90, 90]."""
    if num < 1:
        raise ValueError(f"num: {num!r} must be at least 1")
    return [float(x) for x in np.clip(np.linspace(start, stop, num), -90.0, 90.0)]
