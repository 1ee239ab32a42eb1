"""Evaluation (paper section 4): the row registry, grading where the images are, pure-numpy metrics.

No MLOps imports here; ``pipelines/evaluate.py`` is the DVC stage around them.
"""

from g2p.evaluation.rows import GENERATED, REGISTRY, ROWS, EvalRow, row
from g2p.evaluation.metrics import (
    all_species_prototypes,
    bergmann_slope,
    best_of_k,
    bootstrap_ci,
    derangement,
    gaussian_kde,
    kmer_profiles,
    nearest_barcodes,
    nearest_species,
    random_other_indices,
    rate_with_ci,
    ratio_ci,
    score_densities,
    species_hits,
    species_prototypes,
    success_threshold,
    topk_metrics,
    trait_errors,
)

__all__ = [
    "GENERATED", "REGISTRY", "ROWS", "EvalRow", "row",
    "all_species_prototypes", "bergmann_slope", "best_of_k", "bootstrap_ci", "derangement", "gaussian_kde",
    "kmer_profiles",
    "nearest_barcodes", "nearest_species", "random_other_indices", "rate_with_ci", "ratio_ci",
    "score_densities", "species_hits", "species_prototypes", "success_threshold", "topk_metrics",
    "trait_errors",
]
