"""The evaluation's rows, one registry: a row's name, how its images are obtained, how it is reported.

Adding a row is one entry here: the evaluate stage draws its images by its
``source``, the judge and the trait reader grade them like every row's, and
the tables, plots and figures list it under its ``title``.

Sources:

- ``record``: real images of the barcode's species: its own record's image
  first, then the other records of that species in the split, k in all
  (cycled when the split holds fewer: best-of-k then reads every real image
  there is);
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


REGISTRY: tuple[EvalRow, ...] = (
    EvalRow("ground_truth", "record", "Ground truth (the record's image)"),
    EvalRow("random", "other_species", "Random (images of other species)"),
    EvalRow("no_aligner", "generated", "Stable Diffusion (no aligner)"),
    EvalRow("g2pdiffusion", "generated", "G2PDiffusion", aligner=True),
    EvalRow("nearest_neighbour", "nearest_barcodes", "Nearest neighbour (closest training barcodes)"),
)



@dataclass(frozen=True)
class Comparison:
    """A question the report answers in words: row ``a`` against row ``b`` on the same barcodes and seeds."""

    a: str
    b: str
    question: str

    @property
    def name(self) -> str:
        return f"{self.a}_vs_{self.b}"


# Every comparison the report states in words; each is a paired difference per barcode with a
# species-clustered bootstrap interval, and "higher"/"lower" only where that interval excludes 0.
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("g2pdiffusion", "no_aligner", "Does the aligner's guidance help?"),
    Comparison("g2pdiffusion", "nearest_neighbour",
               "Does the generator beat retrieving the training images of the closest barcodes?"),
    Comparison("no_aligner", "nearest_neighbour", "Does the generator without the aligner beat retrieval?"),
    *(Comparison(r.name, "random", "How much does it gain over random images of other species?")
      for r in REGISTRY if r.source != "other_species"),
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


def check_registry(rows: tuple[EvalRow, ...] = REGISTRY, comparisons: tuple[Comparison, ...] = COMPARISONS) -> None:
    """Names unique, exactly one ``record`` row (the reference), known sources, comparisons of two rows."""
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: duplicate names in {names}")
    if [r.name for r in rows if r.source == "record"] != [REFERENCE]:
        raise ValueError(f"rows: exactly one 'record' row, named {REFERENCE!r}, is the relative scores' reference")
    bad = [r.name for r in rows if r.source not in ("record", "other_species", "nearest_barcodes", "generated")]
    if bad:
        raise ValueError(f"rows: unknown source for {bad}")
    unknown = [c.name for c in comparisons if c.a not in names or c.b not in names or c.a == c.b]
    if unknown:
        raise ValueError(f"comparisons: {unknown} name rows that are not two distinct rows of {names}")


check_registry()
