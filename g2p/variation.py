"""The paper's section 4.4: images for mutated barcodes and for a latitude sweep -- the one home.

The mutation and latitude helpers are pure and seeded, so a figure made from
them can be made again; :func:`variation_images` makes the images of both
sweeps for ``g2p vary``, the evaluate stage and the servers' ``/v1/vary``.
:data:`MUTATION_RATES` and :data:`LATITUDES` are the sweeps' defaults
everywhere (``evaluate.mutation_rates`` / ``evaluate.latitudes``, the CLI, the
HTTP request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from g2p.data.normalise import normalise_barcode

MUTATION_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
LATITUDES: tuple[float, ...] = (-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0)

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


@dataclass
class Variation:
    """Images of both sweeps, uint8: ``mutation`` (B, R, n, 3, H, W) for the barcodes ``mutants[i][r]``,
    ``latitude`` (B, L, n, 3, H, W) for each barcode placed at ``latitudes[l]`` (None if not asked for)."""

    rates: list[float]
    mutants: list[list[str]]
    mutation: Any
    latitudes: list[float]
    latitude: Any


def variation_images(pipe: Any, barcodes: Sequence[str], latitudes: Sequence[float | None],
                     longitudes: Sequence[float | None], *, rates: Sequence[float] = MUTATION_RATES,
                     sweep: Sequence[float] | None = LATITUDES, num_images: int = 1, seed: int = 0,
                     batch_images: int = 64, on_images: Callable[[int], None] | None = None,
                     **knobs: Any) -> Variation:
    """Section 4.4 for B barcodes: each mutated at each rate, and each placed at each latitude of ``sweep``.

    Mutants come from :func:`mutation_series` seeded per barcode (``seed + i``).
    Every variant of barcode i uses the *same* noise (image j from
    ``image_seed(seed, i, j)``), so what changes along a sweep is the condition
    alone. ``knobs`` go to the pipeline (steps, guidance scales); a longitude
    of None sweeps at longitude 0.
    """
    import torch

    from g2p.pipeline import generate_uint8

    rates, sweep_l = [float(r) for r in rates], [float(x) for x in (sweep or [])]
    if not rates:
        raise ValueError("rates: need at least one mutation rate")
    for lat in sweep_l:
        if not -90.0 <= lat <= 90.0:
            raise ValueError(f"latitudes: {lat!r} outside [-90, 90]")
    b, r, k = len(barcodes), len(rates), len(sweep_l)
    mutants = [mutation_series(bc, rates, seed=seed + i) for i, bc in enumerate(barcodes)]
    items = [(m, latitudes[i], longitudes[i], i) for i, ms in enumerate(mutants) for m in ms]
    lons = [0.0 if lo is None else lo for lo in longitudes]
    items += [(barcodes[i], la, lons[i], i) for i in range(b) for la in sweep_l]
    imgs = generate_uint8(pipe, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], num_images,
                          seed, batch_images, on_images, seed_index=[x[3] for x in items], **knobs)
    mut = imgs[: b * r].reshape(b, r, *imgs.shape[1:])
    lat = imgs[b * r:].reshape(b, k, *imgs.shape[1:]) if k else None
    return Variation(rates=rates, mutants=mutants, mutation=mut, latitudes=sweep_l,
                     latitude=lat if lat is not None else torch.zeros(0))
