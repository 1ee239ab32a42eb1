"""Variation analysis (paper section 4.4): images for mutated barcodes and for a latitude sweep.

Every variant of a barcode is sampled from the *same* starting noise (one
``generate`` call per variant with the same seed, the barcodes at the same
batch positions), so what changes between the columns of a grid is the
condition alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from g2p.variation import mutation_series

MUTATION_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
LATITUDES = (-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0)


def mutation_images(generator, barcodes: Sequence[str], latitudes: Sequence[float | None],
                    longitudes: Sequence[float | None], rates: Sequence[float] = MUTATION_RATES, n: int = 1,
                    seed: int = 0, on_column: Callable[[int], None] | None = None,
                    **generate_kw) -> tuple[Tensor, list[list[str]]]:
    """Images (B, R, n, 3, H, W) for each barcode mutated at each rate, and the mutants [barcode][rate].

    Mutants come from :func:`g2p.variation.mutation_series` seeded per barcode
    (``seed + i``), so a figure can be made again. ``on_column(images_done)``
    is called after each rate (progress).
    """
    if not rates:
        raise ValueError("rates: need at least one mutation rate")
    mutants = [mutation_series(b, list(rates), seed=seed + i) for i, b in enumerate(barcodes)]
    cols = []
    for j in range(len(rates)):  # each (B, n, 3, H, W), the same noise per batch position
        cols.append(generator.generate([m[j] for m in mutants], latitudes, longitudes, n=n, seed=seed, **generate_kw))
        if on_column:
            on_column(len(barcodes) * n)
    return torch.stack(cols, dim=1), mutants


def latitude_images(generator, barcodes: Sequence[str], longitudes: Sequence[float | None],
                    latitudes: Sequence[float] = LATITUDES, n: int = 1, seed: int = 0,
                    on_column: Callable[[int], None] | None = None, **generate_kw) -> Tensor:
    """Images (B, L, n, 3, H, W) for each barcode placed at each latitude (its own longitude)."""
    if not latitudes:
        raise ValueError("latitudes: need at least one latitude")
    for lat in latitudes:
        if not -90.0 <= float(lat) <= 90.0:
            raise ValueError(f"latitudes: {lat!r} outside [-90, 90]")
    lons = [0.0 if lo is None else lo for lo in longitudes]
    cols = []
    for lat in latitudes:
        cols.append(generator.generate(list(barcodes), [float(lat)] * len(barcodes), lons, n=n, seed=seed,
                                       **generate_kw))
        if on_column:
            on_column(len(barcodes) * n)
    return torch.stack(cols, dim=1)
