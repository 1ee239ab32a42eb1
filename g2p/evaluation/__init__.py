"""Evaluation metrics (paper section 4): pure functions over scores and embeddings.

No MLOps imports here; ``pipelines/evaluate.py`` is the DVC stage around them.
"""

from g2p.evaluation.metrics import (
    ROWS,
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
    "ROWS", "bergmann_slope", "best_of_k", "bootstrap_ci", "derangement", "gaussian_kde", "kmer_profiles",
    "nearest_barcodes", "nearest_species", "random_other_indices", "rate_with_ci", "ratio_ci",
    "score_densities", "species_hits", "species_prototypes", "success_threshold", "topk_metrics",
    "trait_errors",
]
