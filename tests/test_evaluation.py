"""Metric functions of g2p.evaluation on hand-computable and synthetic cases."""

from __future__ import annotations

import numpy as np
import pytest

from g2p.evaluation import metrics as M
from g2p.evaluation import (
    bergmann_slope,
    best_of_k,
    bootstrap_ci,
    derangement,
    gaussian_kde,
    kmer_profiles,
    nearest_barcodes,
    random_other_indices,
    ratio_ci,
    species_hits,
    species_prototypes,
    success_threshold,
    topk_metrics,
    trait_errors,
)


def test_best_of_k_by_hand_and_monotone():
    s = np.array([[0.1, 0.5, 0.2], [0.3, 0.0, 0.9]])
    assert best_of_k(s, 1).tolist() == [0.1, 0.3]
    assert best_of_k(s, 2).tolist() == [0.5, 0.3]
    assert best_of_k(s, 3).tolist() == [0.5, 0.9]
    rng = np.random.default_rng(0)
    r = rng.normal(size=(50, 20))
    means = [best_of_k(r, k).mean() for k in (1, 2, 5, 10, 20)]
    assert all(a <= b for a, b in zip(means, means[1:]))
    # a single image (ground truth) is its own best at every k
    one = rng.normal(size=7)
    assert np.array_equal(best_of_k(one, 10), one)
    with pytest.raises(ValueError, match="k"):
        best_of_k(s, 0)


def test_bootstrap_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (30, 300, 3000):
        v = (rng.random(n) < 0.3).astype(float)
        lo, hi = bootstrap_ci(v, reps=500, seed=0)
        assert lo <= v.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # same seed, same interval
    v = rng.random(40)
    assert bootstrap_ci(v, 200, seed=3) == bootstrap_ci(v, 200, seed=3)
    # constant data: zero-width interval at the value
    assert bootstrap_ci(np.full(10, 0.25), 100) == (0.25, 0.25)


def test_ratio_ci_contains_ratio_of_means():
    rng = np.random.default_rng(2)
    num, den = rng.normal(0.2, 0.05, 100), rng.normal(0.5, 0.05, 100)
    lo, hi = ratio_ci(num, den, reps=500)
    assert lo < num.mean() / den.mean() < hi


def test_kde_integrates_to_one():
    grid = np.linspace(-5, 5, 2001)
    d = gaussian_kde(np.random.default_rng(0).normal(size=200), grid)
    assert abs(np.trapezoid(d, grid) - 1.0) < 1e-2


def test_threshold_between_two_separated_gaussians():
    rng = np.random.default_rng(0)
    true = rng.normal(0.5, 0.08, 2000)
    shuffled = rng.normal(0.0, 0.08, 2000)
    t = success_threshold(true, shuffled)
    assert 0.2 < t < 0.3  # equal spreads and sizes: crossing at the midpoint 0.25
    # a wider shuffled density moves the crossing towards the true mode
    t2 = success_threshold(true, rng.normal(0.0, 0.16, 2000))
    assert t2 > t
    # a judge that tells nothing: the midpoint of the means, no crash
    same = rng.normal(0.1, 0.1, 500)
    assert abs(success_threshold(same, same[::-1]) - 0.1) < 0.05


def test_topk_metrics_by_hand():
    scores = np.array([[0.1, 0.6], [0.4, 0.2], [0.0, 0.1], [0.5, 0.5]])
    gt = np.array([0.5, 0.5, 0.5, 0.5])
    m = topk_metrics(scores, gt, threshold=0.3, ks=[1, 2], reps=200)
    assert m["score@1"] == pytest.approx((0.1 + 0.4 + 0.0 + 0.5) / 4)
    assert m["score@2"] == pytest.approx((0.6 + 0.4 + 0.1 + 0.5) / 4)
    assert m["relative_score@2"] == pytest.approx(m["score@2"] / 0.5)
    assert m["success@1"] == 0.5 and m["success@2"] == 0.75
    for k in (1, 2):
        assert m[f"success@{k}_low"] <= m[f"success@{k}"] <= m[f"success@{k}_high"]
    with pytest.raises(ValueError, match="gt_scores"):
        topk_metrics(scores, gt[:3], 0.3, [1])


def test_species_accuracy_perfect_and_chance():
    rng = np.random.default_rng(0)
    n_species, d = 20, 32
    names = [f"sp{i}" for i in range(n_species)]
    barcode_species = np.repeat(names, 5)
    centres = rng.normal(size=(n_species, d))
    bc = np.repeat(centres, 5, axis=0) + 0.01 * rng.normal(size=(100, d))
    sp_names, protos = species_prototypes(bc, barcode_species)
    assert list(sp_names) == sorted(names)
    # images embedded at their species centre: all correct
    assert species_hits(bc, barcode_species, sp_names, protos).mean() == 1.0
    # random image embeddings: about one in twenty
    hits = species_hits(rng.normal(size=(4000, d)), rng.choice(names, 4000), sp_names, protos)
    assert abs(hits.mean() - 1 / n_species) < 0.02


def test_kmer_nearest_barcodes():
    rng = np.random.default_rng(0)
    refs = ["".join(rng.choice(list("ACGT"), 300)) for _ in range(5)]
    # a query that is ref 3 with a few substitutions and a shifted start finds ref 3
    q = list(refs[3][7:])
    for i in (10, 50, 120):
        q[i] = "A" if q[i] != "A" else "C"
    idx = nearest_barcodes(["".join(q)], refs, n=2)
    assert idx.shape == (1, 2) and idx[0, 0] == 3
    assert nearest_barcodes(refs, refs, n=1)[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert (nearest_barcodes(refs, refs, n=1, exclude_self=True)[:, 0] != np.arange(5)).all()
    p = kmer_profiles(["ACGTN" * 10], k=2)
    assert p.shape == (1, 16) and p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n"):
        nearest_barcodes(["ACGT"], refs, n=6)


def test_derangement_and_random_other():
    for n in (2, 3, 10, 101):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and (p != np.arange(n)).all()
    species = np.array(["a", "a", "b", "c", "c"], dtype=object)
    idx = random_other_indices(species, ["a", "c"], k=4, seed=0)
    assert idx.shape == (2, 4)
    assert (species[idx[0]] != "a").all() and (species[idx[1]] != "c").all()
    with pytest.raises(ValueError, match="species"):
        random_other_indices(np.array(["a", "a"], dtype=object), ["a"], k=1)


def test_bergmann_slope_recovers_coefficient():
    rng = np.random.default_rng(0)
    lat = np.tile(np.linspace(-60, 60, 13), 4)
    group = np.repeat(np.arange(4), 13)
    base = np.array([0.8, 1.0, 1.2, 0.9])[group]
    size = base * (1 + 0.008 * np.abs(lat)) + 0.002 * rng.normal(size=len(lat))
    assert bergmann_slope(np.abs(lat), size, group) == pytest.approx(0.008, abs=5e-4)
    assert abs(bergmann_slope(np.abs(lat), base, group)) < 1e-9
    with pytest.raises(ValueError, match="abs_lat"):
        bergmann_slope(np.zeros(3), np.ones(3))


def test_trait_errors():
    pred = {"body_size": np.array([1.0, 2.0]), "wing_hue": np.array([0.5, 0.5]), "extra": np.zeros(2)}
    truth = {"body_size": np.array([1.5, 2.0]), "wing_hue": np.array([0.0, 1.0])}
    e = trait_errors(pred, truth, scale={"body_size": 0.5, "wing_hue": 0.5})
    assert e["body_size"] == pytest.approx(0.25) and e["wing_hue"] == pytest.approx(0.5)
    assert "extra" not in e
    assert e["mean_normalised_error"] == pytest.approx((0.5 + 1.0) / 2)


def test_select_barcodes_per_species_and_max_species():
    from pipelines.evaluate import select_barcodes

    species = np.array(["b", "a", "b", "c", "a", "d", "e"], dtype=object)
    assert select_barcodes(species, 1).tolist() == [1, 0, 3, 5, 6]  # first record of a, b, c, d, e
    assert select_barcodes(species, 2).tolist() == [1, 4, 0, 2, 3, 5, 6]
    assert sorted(select_barcodes(species, 0).tolist()) == list(range(7))
    assert species[select_barcodes(species, 1, max_species=3)].tolist() == ["a", "c", "e"]


def test_paired_difference_clusters_and_pairs() -> None:
    from g2p.evaluation.metrics import paired_difference

    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    # a shared per-barcode effect cancels in the paired difference: a tight interval around 0.1
    d = paired_difference(base + 0.1, base, reps=500)
    assert d["diff"] == pytest.approx(0.1) and d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
    noisy = paired_difference(base + rng.normal(scale=0.5, size=200) + 0.2, base, reps=500)
    assert noisy["low"] < 0.2 < noisy["high"] and noisy["low"] > 0
    # clustering by species widens the interval when the species share their difference
    sp = np.repeat(np.arange(20), 10).astype(str)
    shared = np.repeat(rng.normal(size=20), 10)
    flat = paired_difference(shared, np.zeros(200), reps=500)
    clus = paired_difference(shared, np.zeros(200), clusters=sp, reps=500)
    assert clus["high"] - clus["low"] > 2 * (flat["high"] - flat["low"]) and clus["n_clusters"] == 20
    with pytest.raises(ValueError, match="paired"):
        paired_difference(np.zeros(3), np.zeros(4))


def test_paired_comparisons_state_a_direction_only_when_the_interval_excludes_zero() -> None:
    from g2p.evaluation.metrics import MDD_FACTOR, paired_comparisons, per_barcode_values

    rng = np.random.default_rng(1)
    species = np.repeat(np.arange(30), 4).astype(str)
    base = rng.uniform(0.2, 0.6, size=(120, 3))
    hits = (rng.random((120, 3)) < 0.5).astype(float)
    rows = {"better": per_barcode_values(base + 0.2, np.ones_like(hits), 0.5, (1, 3)),
            "same": per_barcode_values(base + rng.normal(scale=0.01, size=base.shape), hits, 0.5, (1, 3)),
            "base": per_barcode_values(base, hits, 0.5, (1, 3))}
    assert set(rows["base"]) == {"species_accuracy", "score@1", "score@3", "success@1", "success@3"}
    assert rows["base"]["score@3"].tolist() == base.max(axis=1).tolist()
    out = paired_comparisons(rows, [("better", "base"), ("same", "base"), ("base", "better")], species, reps=400)
    assert out["better_vs_base"]["score@1"]["diff"] == pytest.approx(0.2)
    assert out["better_vs_base"]["score@1"]["verdict"] == "higher"
    assert out["base_vs_better"]["species_accuracy"]["verdict"] == "lower"
    assert out["same_vs_base"]["score@1"]["verdict"] == "no detectable difference"
    d = out["same_vs_base"]["score@3"]
    assert d["n_clusters"] == 30 and d["mdd"] == pytest.approx(MDD_FACTOR * d["se"]) and d["se"] > 0


def test_threshold_at_a_false_positive_rate_on_same_genus_negatives() -> None:
    from g2p.evaluation.metrics import fpr_threshold, same_genus_negatives

    species = np.array(["a1", "a1", "a2", "a2", "b1", "b1", "c1"])
    genus = np.array(["a", "a", "a", "a", "b", "b", "c"])
    idx, same = same_genus_negatives(species, genus, seed=3)
    assert same.tolist() == [True] * 4 + [False] * 3  # genus b and c have one species here: any other species
    assert all(species[j] != species[i] for i, j in enumerate(idx))
    assert all(genus[idx[i]] == genus[i] for i in range(4))
    neg = np.linspace(0, 1, 101)
    t = fpr_threshold(neg, 0.05)
    assert (neg > t).mean() <= 0.05 and (neg >= t).mean() > 0.05
    with pytest.raises(ValueError, match="fpr"):
        fpr_threshold(neg, 0.0)


def test_species_clustered_intervals_widen_with_duplicated_barcodes() -> None:
    """Ten barcodes of one species are one piece of evidence: the clustered interval (topk_metrics with
    clusters, ratio_of_means) is wider than the barcode bootstrap, and the point values do not change."""
    rng = np.random.default_rng(0)
    per_species = rng.normal(0.5, 0.2, 8)
    scores = np.repeat(per_species, 10)[:, None] + rng.normal(0, 0.01, (80, 1))
    gt = np.full(80, 0.8)
    species = np.repeat([f"s{i}" for i in range(8)], 10)
    plain = M.topk_metrics(scores, gt, 0.5, [1], 500, 0)
    clustered = M.topk_metrics(scores, gt, 0.5, [1], 500, 0, clusters=species)
    assert clustered["score@1"] == plain["score@1"] and clustered["relative_score@1"] == plain["relative_score@1"]
    width = {n: m["score@1_high"] - m["score@1_low"] for n, m in (("plain", plain), ("clustered", clustered))}
    assert width["clustered"] > 2 * width["plain"]
    r = M.ratio_of_means(scores[:, 0], gt, species, 500, 0)
    assert r["ratio"] == pytest.approx(scores.mean() / 0.8) and r["low"] < r["ratio"] < r["high"]
    assert r["n_clusters"] == 8
    with pytest.raises(ValueError, match="denominator"):
        M.ratio_of_means(scores[:, 0], np.zeros(80))
