"""The evaluation's rows, one registry: a row's name, how its images are obtained, how it is reported.

Adding a row is one entry here: the evaluate stage draws its images by its
``source``, the judge and the trait reader grade them like every row's, and
the tables, plots and figures list it under its ``title``.

Sources:

- ``record``: the barcode's own record image (one image: its best-of-k is
  that image at every k);
- ``other_species``: k real images of other species of the same split;
- ``nearest_barcodes``: the images of the k training records whose barcodes
  are closest (:func:`g2p.evaluation.metrics.nearest_barcodes`);
- ``generated``: k images from the pipeline, image j of barcode i from
  ``image_seed(seed, i, j)`` in every generated row (rows paired sample for
  sample), with the aligner's guidance at ``sampling.aligner_guidance_scale``
  (``aligner=True``) or 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["record", "other_species", "nearest_barcodes", "generated"]


@dataclass(frozen=True)
class EvalRow:
    name: str
    source: Source
    title: str
    aligner: bool = False  # generated rows: the aligner's guidance on

    @property
    def num_images(self) -> str:
        """"one" (a single image, the same at every k) or "k"."""
        return "one" if self.source == "record" else "k"


REGISTRY: tuple[EvalRow, ...] = (
    EvalRow("ground_truth", "record", "Ground truth (the record's image)"),
    EvalRow("random", "other_species", "Random (images of other species)"),
    EvalRow("no_aligner", "generated", "Stable Diffusion (no aligner)"),
    EvalRow("g2pdiffusion", "generated", "G2PDiffusion", aligner=True),
    EvalRow("nearest_neighbour", "nearest_barcodes", "Nearest neighbour (closest training barcodes)"),
)

ROWS: tuple[str, ...] = tuple(r.name for r in REGISTRY)
GENERATED: tuple[str, ...] = tuple(r.name for r in REGISTRY if r.source == "generated")  # the sampler makes these
REFERENCE = "ground_truth"  # the row relative scores divide by
_BY_NAME = {r.name: r for r in REGISTRY}


def row(name: str) -> EvalRow:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"row: {name!r} is not one of {list(ROWS)}") from None


def check_registry(rows: tuple[EvalRow, ...] = REGISTRY) -> None:
    """Names unique, exactly one ``record`` row (the reference), known sources."""
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: duplicate names in {names}")
    if [r.name for r in rows if r.source == "record"] != [REFERENCE]:
        raise ValueError(f"rows: exactly one 'record' row, named {REFERENCE!r}, is the relative scores' reference")
    bad = [r.name for r in rows if r.source not in ("record", "other_species", "nearest_barcodes", "generated")]
    if bad:
        raise ValueError(f"rows: unknown source for {bad}")


check_registry()
