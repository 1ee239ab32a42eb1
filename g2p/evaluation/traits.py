"""Trait errors against the synthetic truth, per trait and per trait group: pure numpy over the trait reader's
readings (:mod:`g2p.trait_reader`), for the evaluate stage's gold standard.

Errors are normalised by the error of a random other species' truth (0 perfect, 1 no better than another
species); the floor is the reader on the real images of the same records, the ceiling ``genus_oracle`` the
mean traits of the genus's training records; intervals resample whole species.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from g2p.evaluation import metrics as M
from g2p.trait_reader import TRAIT_GROUPS, trait_errors

ORACLE = "genus_oracle"  # the trait ceiling: a reader of the genus alone (g2p.trait_reader.genus_oracle)
TRAIT_COMPARISONS = (("g2pdiffusion", ORACLE), ("no_aligner", ORACLE), ("nearest_neighbour", ORACLE),
                     ("g2pdiffusion", "no_aligner"), ("g2pdiffusion", "nearest_neighbour"))


def group_errors(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                 baseline: dict[str, float]) -> dict[str, np.ndarray]:
    """Per barcode and trait group (``TRAIT_GROUPS``): the mean over the group's traits of error / a random
    other species' error (0 perfect, 1 no better than another species), and ``all`` over every trait."""
    errs = trait_errors(pred, truth)
    norm = {n: e / baseline[n] for n, e in errs.items() if baseline.get(n, 0) > 0}
    out = {g: np.mean([norm[n] for n in names if n in norm], axis=0) for g, names in TRAIT_GROUPS.items()
           if any(n in norm for n in names)}
    out["all"] = np.mean(list(norm.values()), axis=0)
    return out


def trait_group_report(readings: dict[str, dict[str, np.ndarray]], truth: dict[str, np.ndarray],
                       baseline: dict[str, float], species: np.ndarray, reps: int, seed: int) -> dict[str, Any]:
    """Each row's (and the genus oracle's) normalised error per trait group with species-clustered 95%
    intervals, and the paired differences of ``TRAIT_COMPARISONS`` (negative: the first has lower error)."""
    per = {row: group_errors(pred, truth, baseline) for row, pred in readings.items()}
    out: dict[str, Any] = {"groups": {row: {g: M.clustered_mean(v, species, reps, seed) for g, v in gs.items()}
                                      for row, gs in per.items()}}
    out["paired"] = {}
    for a, b in TRAIT_COMPARISONS:
        if a in per and b in per:
            res = {}
            for g in per[a]:
                d = M.paired_difference(per[a][g], per[b][g], species, reps, seed)
                res[g] = {**d, "verdict": {"higher": "higher error", "lower": "lower error"}.get(
                    M.verdict(d), "no detectable difference")}
            out["paired"][f"{a}_vs_{b}"] = res
    return out


def mean_trait_errors(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                      baseline: dict[str, float]) -> dict[str, float]:
    """Mean error per trait (circular turns for hues, error rate for categoricals, |diff| otherwise) and
    ``mean_normalised_error``: the mean over traits of error / the error of a random other species' truth
    (1 = no better than guessing another species, 0 = perfect)."""
    errs = {n: float(np.mean(e)) for n, e in trait_errors(pred, truth).items()}
    norm = [errs[n] / baseline[n] for n in errs if baseline.get(n, 0) > 0]
    errs["mean_normalised_error"] = float(np.mean(norm)) if norm else float("nan")
    return errs
