"""Many (barcode, place, seed) rows through the one pipeline: batched, checked row by row, scored.

The framework-free core of batch prediction (``g2p predict``, the evaluate
stage's generated rows) and of the HTTP servers' batching:

- :func:`generate_items` answers items of (barcode, latitude, longitude, n,
  seed) sharing their knobs in pipeline calls of about ``batch_images``
  images. An item's images are those of ``pipe(barcode, latitude, longitude,
  num_images_per_barcode=n, generator=torch.Generator().manual_seed(seed))``
  alone, byte for byte, whatever it is batched with: the pipeline draws noise
  image by image from each image's generator and runs every network on exactly
  ``micro_batch_size`` rows (see ``G2PDiffusionPipeline.set_micro_batch_size``).
- :func:`check_row` validates one table row and names the field and the value
  of the first problem, so a table's bad rows are reported, not fatal.
- :func:`predict_rows` is one batch of a table: rows in, one record per image
  out (PNG bytes, the judge's score, the error of a bad row), rows in x n =
  records out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from g2p.data.normalise import check_barcode, check_coordinates
from g2p.images import png_bytes
from g2p.pipeline import G2PDiffusionPipeline, images_uint8

Item = tuple[str, "float | None", "float | None", int, int]  # (barcode, latitude, longitude, n, seed)
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Knobs:
    """What a pipeline call shares (``None``: the model's ``sampling`` default)."""

    steps: int | None = None
    guidance_scale: float | None = None
    aligner_guidance_scale: float | None = None
    scheduler: str | None = None

    def resolved(self, sampling: Any) -> "Knobs":
        """Every knob set: ``None`` ones from ``sampling`` (a model's ``SamplingConfig``)."""
        s = sampling
        return Knobs(int(s.steps if self.steps is None else self.steps),
                     float(s.guidance_scale if self.guidance_scale is None else self.guidance_scale),
                     float(s.aligner_guidance_scale if self.aligner_guidance_scale is None
                           else self.aligner_guidance_scale),
                     self.scheduler or s.scheduler)

    def call_kwargs(self) -> dict[str, Any]:
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "aligner_guidance_scale": self.aligner_guidance_scale}


def generate_items(pipe: G2PDiffusionPipeline, items: Sequence[Item], knobs: Knobs,
                   batch_images: int | None = None, on_images: Callable[[int], Any] | None = None) -> list[Tensor]:
    """uint8 (n, 3, H, W) per item, in pipeline calls of about ``batch_images`` images (default: all in one).

    ``pipe`` must already carry ``knobs.scheduler`` (``pipe.with_scheduler``);
    an item never straddles two calls, so a call may exceed ``batch_images``
    by one item's images. ``on_images(k)`` after each call (progress)."""
    out: list[Tensor] = []
    kw = knobs.call_kwargs()
    start = 0
    while start < len(items):
        stop, size = start, 0
        while stop < len(items) and (stop == start or batch_images is None or size + items[stop][3] <= batch_images):
            size += items[stop][3]
            stop += 1
        barcodes, lats, lons, gens, sizes = [], [], [], [], []
        for seq, lat, lon, n, seed in items[start:stop]:
            g = torch.Generator().manual_seed(int(seed))  # one per item, drawn image by image
            barcodes += [seq] * n
            lats += [lat] * n
            lons += [lon] * n
            gens += [g] * n
            sizes.append(n)
        imgs = pipe(barcodes, lats, lons, num_images_per_barcode=1, generator=gens, output_type="pt", **kw).images
        out += list(torch.split(images_uint8(imgs), sizes))
        if on_images is not None:
            on_images(size)
        start = stop
    return out


def check_seed(v: Any, default: int) -> int:
    """A row's seed: absent (None, NaN, '') -> ``default``; otherwise an integer in [0, 2^63)."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return default
    try:
        f = float(v) if isinstance(v, str) else v
        ok = not isinstance(f, bool) and float(f).is_integer() and 0 <= int(f) <= MAX_SEED
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"seed: {v!r} must be an integer in [0, 2^63)")
    return int(f)


def check_row(barcode: Any, latitude: Any, longitude: Any, seed: Any,
              default_seed: int) -> tuple[str, float | None, float | None, int]:
    """(normalised barcode, latitude, longitude, seed) of one row; ``ValueError`` naming field and value."""
    seq = check_barcode(barcode if not (isinstance(barcode, float) and math.isnan(barcode)) else None)
    lat, lon = check_coordinates(latitude, longitude)
    return seq, lat, lon, check_seed(seed, default_seed)


def predict_rows(pipe: G2PDiffusionPipeline, judge: Any, rows: Sequence[dict[str, Any]], knobs: Knobs,
                 num_images: int, batch_images: int, default_seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One batch of a table: ``rows`` (``barcode``; ``latitude``, ``longitude``, ``seed`` optional) ->
    ``len(rows) * num_images`` records ``{"row", "sample", "seed", "image", "score", "error"}``, in order.

    A row that fails :func:`check_row` gives ``num_images`` records with
    ``image``/``score`` None and ``error`` naming the field and the value;
    the others are generated in calls of about ``batch_images`` images.
    ``default_seeds[i]`` is row i's seed when it has none. ``pipe`` carries
    ``knobs.scheduler``; ``knobs`` are resolved (:meth:`Knobs.resolved`).
    """
    if len(default_seeds) != len(rows):
        raise ValueError(f"default_seeds: {len(default_seeds)} seeds for {len(rows)} rows")
    checked: list[tuple[str, float | None, float | None, int] | str] = []
    for r, d in zip(rows, default_seeds):
        try:
            checked.append(check_row(r.get("barcode"), r.get("latitude"), r.get("longitude"), r.get("seed"), d))
        except ValueError as e:
            checked.append(str(e))
    ok = [i for i, c in enumerate(checked) if not isinstance(c, str)]
    items = [(c[0], c[1], c[2], num_images, c[3]) for c in (checked[i] for i in ok)]
    images = dict(zip(ok, generate_items(pipe, items, knobs, batch_images))) if items else {}
    out: list[dict[str, Any]] = []
    for i, c in enumerate(checked):
        if isinstance(c, str):
            seed = None
            try:
                seed = check_seed(rows[i].get("seed"), default_seeds[i])
            except ValueError:
                pass
            out += [{"row": i, "sample": j, "seed": seed, "image": None, "score": None, "error": c}
                    for j in range(num_images)]
            continue
        im = images[i]
        scores: list[float | None] = [None] * num_images
        if judge is not None:
            with torch.no_grad():
                scores = [float(s) for s in judge.score(im, [c[0]] * num_images)]
        out += [{"row": i, "sample": j, "seed": c[3], "image": png_bytes(im[j]), "score": scores[j], "error": None}
                for j in range(num_images)]
    return out

