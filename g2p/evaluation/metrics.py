"""Metrics of the paper's section 4 (Tables 1 and 2, Figure 4, section 4.4) on plain arrays.

Pure numpy: scores in, numbers out. The pipeline stage (``pipelines/evaluate.py``)
feeds them the judge's cosines; the definitions are those of
``ANCHORS.md``:

- **CLIBDScore**: cosine of an image's and a barcode's judge embeddings.
- **Success threshold**: where the score densities of true and shuffled pairs
  cross, between their two modes (the paper's Figure 4; 0.255 for CLIBD).
- **Top-k** (best of k): k images per (barcode, place); a barcode's score@k is
  the highest of its first k scores, so score@k never falls as k grows;
  success@k is the share of barcodes with at least one of the k above the
  threshold.
- **Relative score@k** = mean score@k / mean ground-truth score over the same
  barcodes: a ratio of averages, which is how the paper's numbers read
  (G2PDiffusion 0.182 / ground truth 0.512 = 0.356).
- Rates carry 95% percentile-bootstrap intervals over barcodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from g2p.evaluation.rows import GENERATED, ROWS  # noqa: F401 (re-exported: the row registry's names)


def _2d(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"{name}: expected (barcodes, samples), got shape {np.shape(scores)}")
    return s


def best_of_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, K) scores -> (B,) best of the first ``k`` (all K when ``k`` > K: a single real image is its own best)."""
    s = _2d(scores)
    if k < 1:
        raise ValueError(f"k: {k!r} must be at least 1")
    return s[:, :k].max(axis=1)


def bootstrap_ci(values: np.ndarray, reps: int = 1000, seed: int = 0, level: float = 0.95,
                 stat: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: the mean) over the first axis of ``values``.

    ``stat`` takes a (reps, n, ...) array of resamples and returns (reps,).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if reps < 1:
        raise ValueError(f"reps: {reps!r} must be at least 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(reps, len(v)))
    boots = v[idx].mean(axis=1) if stat is None else np.asarray(stat(v[idx]))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def clustered_mean(values: np.ndarray, clusters: Sequence[str], reps: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float]:
    """Mean of per-barcode ``values`` with a bootstrap interval that resamples whole ``clusters`` (species):
    ``{"mean", "low", "high"}``."""
    d = paired_difference(values, np.zeros(len(values)), clusters, reps, seed, level)
    return {"mean": d["diff"], "low": d["low"], "high": d["high"]}


def paired_difference(a: np.ndarray, b: np.ndarray, clusters: Sequence[str] | None = None, reps: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """mean(a - b) over paired units (barcodes, same seeds) with a cluster bootstrap interval.

    ``a``, ``b``: (B,) per-barcode values of two rows on the same barcodes and
    seeds. ``clusters`` (B,), e.g. species: whole clusters are resampled, so
    barcodes of one species are not counted as independent evidence. Returns
    ``{"diff", "low", "high", "se", "mdd", "n_barcodes", "n_clusters"}``: ``se``
    the bootstrap standard error, ``mdd`` the minimum detectable difference
    (two-sided 5% test, 80% power: (1.96 + 0.84) x se), the smallest true
    difference this many barcodes and species would usually reveal.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"a, b: need two equal-length 1-d arrays of paired values, got {a.shape} and {b.shape}")
    d = a - b
    groups = np.arange(len(d)) if clusters is None else np.unique(np.asarray(clusters, dtype=object),
                                                                  return_inverse=True)[1]
    ng = int(groups.max()) + 1
    sums = np.bincount(groups, weights=d, minlength=ng)  # (G,)
    counts = np.bincount(groups, minlength=ng).astype(np.float64)  # (G,)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, ng, size=(reps, ng))  # (reps, G) resampled clusters
    boots = sums[pick].sum(1) / counts[pick].sum(1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    se = float(boots.std(ddof=1)) if reps > 1 else float("nan")
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "se": se, "mdd": MDD_FACTOR * se,
            "n_barcodes": int(len(d)), "n_clusters": ng}


def ratio_of_means(a: np.ndarray, b: np.ndarray, clusters: Sequence[str] | None = None, reps: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """mean(a) / mean(b) over paired units with a cluster bootstrap interval (the same resampled units in
    numerator and denominator): ``{"ratio", "low", "high", "n_barcodes", "n_clusters"}``; e.g. a generated
    slope over the positive control's, species by species. Resamples whose denominator is 0 are dropped."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"a, b: need two equal-length 1-d arrays of paired values, got {a.shape} and {b.shape}")
    if b.mean() == 0:
        raise ValueError("b: the denominator's mean is 0; the ratio is undefined")
    groups = np.arange(len(a)) if clusters is None else np.unique(np.asarray(clusters, dtype=object),
                                                                  return_inverse=True)[1]
    ng = int(groups.max()) + 1
    sa, sb = np.bincount(groups, weights=a, minlength=ng), np.bincount(groups, weights=b, minlength=ng)
    pick = np.random.default_rng(seed).integers(0, ng, size=(reps, ng))
    num, den = sa[pick].sum(1), sb[pick].sum(1)
    boots = num[den != 0] / den[den != 0]
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return {"ratio": float(a.mean() / b.mean()), "low": float(lo), "high": float(hi), "n_barcodes": int(len(a)),
            "n_clusters": ng}


MDD_FACTOR = 1.959964 + 0.841621  # z(0.975) + z(0.80): the minimum detectable difference in standard errors


def verdict(diff: Mapping[str, float]) -> str:
    """How a paired difference may be stated in words: "higher" / "lower" only where its interval
    excludes 0, else "no detectable difference"."""
    if diff["low"] > 0:
        return "higher"
    if diff["high"] < 0:
        return "lower"
    return "no detectable difference"


def per_barcode_values(scores: np.ndarray, hits: np.ndarray, threshold: float,
                       ks: Sequence[int]) -> dict[str, np.ndarray]:
    """A row's per-barcode measurements, the units every paired comparison pairs: ``score@k`` (best of
    the first k), ``success@k`` (that best above ``threshold``) and ``species_accuracy`` (the share of
    the barcode's images the judge assigns to its species). ``scores``, ``hits``: (B, K)."""
    s, h = _2d(scores), _2d(hits, "hits")
    out = {"species_accuracy": h.mean(axis=1)}
    for k in ks:
        best = best_of_k(s, k)
        out[f"score@{k}"], out[f"success@{k}"] = best, (best > threshold).astype(np.float64)
    return out


def paired_comparisons(values: Mapping[str, Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]],
                       species: Sequence[str], reps: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{"a_vs_b": {metric: paired_difference + verdict}}`` for each (a, b) in ``pairs``, on the metrics
    both rows have (:func:`per_barcode_values`), clustered by the barcodes' ``species``."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        va, vb = values[a], values[b]
        res = {}
        for m in (m for m in va if m in vb):
            d = paired_difference(va[m], vb[m], species, reps, seed)
            res[m] = {**d, "verdict": verdict(d)}
        out[f"{a}_vs_{b}"] = res
    return out


def ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of mean(num) / mean(den), resampling paired barcodes."""
    pairs = np.stack([np.asarray(num, float), np.asarray(den, float)], axis=1)
    return bootstrap_ci(pairs, reps, seed, level, stat=lambda b: b[..., 0].mean(1) / b[..., 1].mean(1))


def gaussian_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``samples`` on ``grid`` (Scott's rule bandwidth by default)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if len(x) < 2:
        raise ValueError(f"samples: need at least 2 values for a density, got {len(x)}")
    h = bandwidth or max(1.06 * x.std(ddof=1) * len(x) ** (-1 / 5), 1e-3)
    z = (np.asarray(grid, dtype=np.float64)[:, None] - x[None, :]) / h
    return np.exp(-0.5 * z * z).sum(axis=1) / (len(x) * h * np.sqrt(2 * np.pi))


def score_densities(true_scores: np.ndarray, shuffled_scores: np.ndarray,
                    num: int = 401) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, density of true pairs, density of shuffled pairs) over [-1, 1]."""
    grid = np.linspace(-1.0, 1.0, num)
    return grid, gaussian_kde(true_scores, grid), gaussian_kde(shuffled_scores, grid)


def success_threshold(true_scores: np.ndarray, shuffled_scores: np.ndarray, num: int = 2001) -> float:
    """Where the true-pair and shuffled-pair densities cross between their modes.

    If the shuffled mode is not below the true mode (a judge that tells nothing)
    the midpoint of the two means is returned; if the densities never cross
    between the modes (they barely overlap), the point of least summed density.
    """
    t, s = np.asarray(true_scores, float), np.asarray(shuffled_scores, float)
    grid = np.linspace(-1.0, 1.0, num)
    dt, ds = gaussian_kde(t, grid), gaussian_kde(s, grid)
    lo, hi = int(np.argmax(ds)), int(np.argmax(dt))
    if lo >= hi:
        return float((t.mean() + s.mean()) / 2)
    diff = dt[lo:hi + 1] - ds[lo:hi + 1]  # negative at the shuffled mode, positive at the true one
    cross = np.nonzero((diff[:-1] < 0) & (diff[1:] >= 0))[0]
    if len(cross) == 0:
        return float(grid[lo + int(np.argmin(dt[lo:hi + 1] + ds[lo:hi + 1]))])
    i = lo + int(cross[-1])  # the last sign change before the true mode
    d0, d1 = dt[i] - ds[i], dt[i + 1] - ds[i + 1]
    return float(grid[i] + (grid[i + 1] - grid[i]) * (-d0) / (d1 - d0))


def topk_metrics(scores: np.ndarray, gt_scores: np.ndarray, threshold: float, ks: Sequence[int],
                 reps: int = 1000, seed: int = 0, clusters: Sequence[str] | None = None) -> dict[str, float]:
    """One table row: ``score@k``, ``relative_score@k``, ``success@k`` (+ ``_low``/``_high``) for each k.

    ``scores`` (B, K) are a row's k images per barcode, ``gt_scores`` the
    ground truth's scores for the same barcodes: (B,) one real image, or
    (B, K) real images of the species, whose best of k is the reference at k.
    Intervals: 95% bootstrap over barcodes (the same resamples for every k),
    or, with ``clusters`` (B,) (e.g. species), over whole clusters.
    """
    s = _2d(scores)
    gt_all = np.asarray(gt_scores, dtype=np.float64)
    if gt_all.shape[:1] != (s.shape[0],) or gt_all.ndim not in (1, 2):
        raise ValueError(f"gt_scores: expected shape ({s.shape[0]},) or ({s.shape[0]}, K), got {gt_all.shape}")
    out: dict[str, float] = {}
    for k in ks:
        best = best_of_k(s, k)
        gt = gt_all if gt_all.ndim == 1 else best_of_k(gt_all, k)
        hit = (best > threshold).astype(np.float64)
        out[f"score@{k}"] = float(best.mean())
        out[f"relative_score@{k}"] = float(best.mean() / gt.mean()) if gt.mean() != 0 else float("nan")
        out[f"success@{k}"] = float(hit.mean())
        if clusters is None:
            out[f"score@{k}_low"], out[f"score@{k}_high"] = bootstrap_ci(best, reps, seed)
            out[f"relative_score@{k}_low"], out[f"relative_score@{k}_high"] = ratio_ci(best, gt, reps, seed)
            out[f"success@{k}_low"], out[f"success@{k}_high"] = bootstrap_ci(hit, reps, seed)
            continue
        for key, v in ((f"score@{k}", best), (f"success@{k}", hit)):
            c = clustered_mean(v, clusters, reps, seed)
            out[f"{key}_low"], out[f"{key}_high"] = c["low"], c["high"]
        if gt.mean() != 0:
            r = ratio_of_means(best, gt, clusters, reps, seed)
            out[f"relative_score@{k}_low"], out[f"relative_score@{k}_high"] = r["low"], r["high"]
        else:
            out[f"relative_score@{k}_low"] = out[f"relative_score@{k}_high"] = float("nan")
    return out


def nearest_species(image_emb: np.ndarray, species_emb: np.ndarray) -> np.ndarray:
    """Index of the closest (cosine) species embedding for each image embedding."""
    a = np.asarray(image_emb, np.float64)
    b = np.asarray(species_emb, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.argmax(a @ b.T, axis=1)


def species_prototypes(barcode_emb: np.ndarray, species: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-species mean of barcode embeddings (re-normalised): (names (S,), embeddings (S, D))."""
    sp = np.asarray(species, dtype=object)
    names = np.array(sorted(set(sp.tolist())), dtype=object)
    e = np.asarray(barcode_emb, np.float64)
    protos = np.stack([e[sp == n].mean(axis=0) for n in names])
    return names, protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)


def all_species_prototypes(barcode_embs: Mapping[str, np.ndarray],
                           species: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`species_prototypes` over every split's barcodes together (e.g. ``seen`` test and ``unseen``
    test_unseen): one set of candidates, all seen and unseen species, for every split's species accuracy.

    Why not per split: against its own split's species only, an unseen species' image is never asked
    to beat its seen genus-mates (and a seen one its unseen congeners), so a judge that scores "looks
    like the genus" passes; among all species it counts a hit only when the record's own species is the
    closest. A species in two splits is one candidate (its barcodes pooled).
    """
    if set(barcode_embs) != set(species):
        raise ValueError(f"species: splits {sorted(species)} do not match barcode_embs' {sorted(barcode_embs)}")
    if not barcode_embs:
        raise ValueError("barcode_embs: no split to make prototypes of")
    for split, e in barcode_embs.items():
        if len(e) != len(species[split]):
            raise ValueError(f"species[{split!r}]: {len(species[split])} names for {len(e)} barcode embeddings")
    order = sorted(barcode_embs)
    return species_prototypes(np.concatenate([np.asarray(barcode_embs[s], np.float64) for s in order]),
                              [str(x) for s in order for x in species[s]])


def species_hits(image_emb: np.ndarray, image_species: Sequence[str], names: np.ndarray,
                 protos: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where an image's closest species prototype is its own species, else 0.0."""
    pred = names[nearest_species(image_emb, protos)]
    return (pred == np.asarray(image_species, dtype=object)).astype(np.float64)


def rate_with_ci(hits: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    h = np.asarray(hits, np.float64)
    lo, hi = bootstrap_ci(h, reps, seed)
    return float(h.mean()), lo, hi


def kmer_profiles(barcodes: Sequence[str], k: int = 4) -> np.ndarray:
    """(N, 4^k) k-mer frequency profiles (k-mers with N skipped), L1-normalised."""
    lut = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(b"ACGT"):
        lut[c] = i
    out = np.zeros((len(barcodes), 4 ** k), dtype=np.float64)
    for r, b in enumerate(barcodes):
        codes = lut[np.frombuffer(b.upper().encode(), dtype=np.uint8)]
        if len(codes) < k:
            continue
        win = np.lib.stride_tricks.sliding_window_view(codes, k)
        ok = (win >= 0).all(axis=1)
        idx = (win[ok] * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1)
        np.add.at(out[r], idx, 1.0)
        out[r] /= max(out[r].sum(), 1.0)
    return out


def nearest_barcodes(query: Sequence[str], reference: Sequence[str] | Iterable[Sequence[str]], n: int = 1,
                     k: int = 4, exclude_self: bool = False, chunk: int = 2048, query_chunk: int = 32) -> np.ndarray:
    """(Q, n) indices of the ``n`` reference barcodes closest to each query (L1 distance of k-mer profiles).

    k-mer profiles, not Hamming: barcodes start and end at different read
    positions, so position-wise comparison is meaningless without alignment.
    Ties break by reference order. ``exclude_self`` skips references at
    distance 0 (the query's own record).

    Chunked: ``reference`` is a sequence of barcodes, or an iterable of
    sequences (chunks, e.g. streamed from shards); ``query_chunk`` queries x
    one reference chunk of ``chunk`` barcodes are compared at a time, with a
    running top n: memory is (Q + chunk) x 4^k profiles and query_chunk x
    chunk x 4^k differences (134 MB at the defaults), never Q x R x 4^k.
    """
    if n < 1:
        raise ValueError(f"n: {n!r} must be at least 1")
    ref_chunks: Iterable[Sequence[str]]
    if isinstance(reference, Sequence) and (len(reference) == 0 or isinstance(reference[0], str)):
        ref_chunks = (reference[i:i + chunk] for i in range(0, len(reference), chunk))
    else:
        ref_chunks = reference  # type: ignore[assignment]
    q = kmer_profiles(query, k)
    best_d = np.full((len(q), n), np.inf)
    best_i = np.full((len(q), n), -1, dtype=np.int64)
    offset = 0
    for refs in ref_chunks:
        r = kmer_profiles(refs, k)
        for a in range(0, len(q), query_chunk):
            d = np.abs(q[a:a + query_chunk, None, :] - r[None, :, :]).sum(axis=2)
            if exclude_self:
                d[d == 0] = np.inf
            idx = np.broadcast_to(np.arange(offset, offset + len(r)), d.shape)
            cand_d = np.concatenate([best_d[a:a + query_chunk], d], axis=1)
            cand_i = np.concatenate([best_i[a:a + query_chunk], idx], axis=1)
            # by distance, then by reference index (earlier chunks hold smaller indices): a stable global sort
            order = np.lexsort((cand_i, cand_d), axis=1)[:, :n]
            best_d[a:a + query_chunk] = np.take_along_axis(cand_d, order, axis=1)
            best_i[a:a + query_chunk] = np.take_along_axis(cand_i, order, axis=1)
        offset += len(r)
    if n > offset:
        raise ValueError(f"n: {n!r} must be in [1, {offset}]")
    return best_i


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2): a random cycle."""
    if n < 2:
        raise ValueError(f"n: {n!r} must be at least 2 to shuffle pairs")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):  # Sattolo's algorithm: a uniformly random n-cycle has no fixed point
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def same_genus_negatives(species: Sequence[str], genus: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each record, a random record of *another species of the same genus* (a hard negative), else
    (a genus of one species here) of any other species. Returns (indices (N,), same_genus (N,) bool)."""
    sp, ge = np.asarray(species, dtype=object), np.asarray(genus, dtype=object)
    if len(set(sp.tolist())) < 2:
        raise ValueError(f"species: need records of at least 2 species for negatives, got {sorted(set(sp.tolist()))}")
    rng = np.random.default_rng(seed)
    out, same = np.zeros(len(sp), dtype=np.int64), np.zeros(len(sp), dtype=bool)
    pools: dict[tuple[object, object], np.ndarray] = {}  # one pool per (genus, species), not per record
    for i in range(len(sp)):
        key = (ge[i], sp[i])
        if key not in pools:
            pool = np.nonzero((ge == ge[i]) & (sp != sp[i]))[0]
            pools[key] = pool if len(pool) else np.nonzero(sp != sp[i])[0]
        pool = pools[key]
        same[i] = ge[pool[0]] == ge[i]
        out[i] = pool[rng.integers(0, len(pool))]
    return out, same


def fpr_threshold(negative_scores: np.ndarray, fpr: float) -> float:
    """The score above which at most ``fpr`` of the negative pairs lie (success = score > threshold)."""
    neg = np.asarray(negative_scores, np.float64)
    if len(neg) == 0 or not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr_threshold: need negative scores and 0 < fpr < 1, got {len(neg)} scores, fpr {fpr!r}")
    return float(np.quantile(neg, 1.0 - fpr, method="higher"))


def random_other_indices(species: Sequence[str], query_species: Sequence[str], k: int,
                         seed: int = 0) -> np.ndarray:
    """(Q, k) indices into ``species`` of records of *another* species than each query's (the Random row)."""
    sp = np.asarray(species, dtype=object)
    rng = np.random.default_rng(seed)
    out = np.empty((len(query_species), k), dtype=np.int64)
    for i, s in enumerate(query_species):
        pool = np.nonzero(sp != s)[0]
        if len(pool) == 0:
            raise ValueError(f"species: no record of a species other than {s!r} to draw random images from")
        out[i] = rng.choice(pool, size=k, replace=len(pool) < k)
    return out


def bergmann_slope(abs_lat: np.ndarray, size: np.ndarray, group: np.ndarray | None = None) -> float:
    """Relative size gain per degree of |latitude|: fit size = a (1 + b |lat|), return b.

    With ``group`` (e.g. one id per barcode) each group gets its own linear
    fit size = a_g + c_g |lat| and the result is the mean of c_g / a_g.
    """
    return float(np.mean(bergmann_slopes(abs_lat, size, group)[1]))


def bergmann_slopes(abs_lat: np.ndarray, size: np.ndarray,
                    group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, relative slope c_g / a_g of each group that has two latitudes and a positive intercept):
    the per-group fits :func:`bergmann_slope` averages, for intervals over groups."""
    x, y = np.asarray(abs_lat, float), np.asarray(size, float)
    g = np.zeros(len(x), dtype=np.int64) if group is None else np.asarray(group)
    ids, slopes = [], []
    for gid in np.unique(g):
        m = g == gid
        if np.ptp(x[m]) == 0:
            continue
        slope, intercept = np.polyfit(x[m], y[m], 1)
        if intercept > 0:
            ids.append(gid)
            slopes.append(slope / intercept)
    if not slopes:
        raise ValueError("abs_lat: need at least two different latitudes in a group to fit a slope")
    return np.asarray(ids), np.asarray(slopes, dtype=np.float64)


def trait_errors(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                 scale: dict[str, float] | None = None) -> dict[str, float]:
    """Mean absolute error per trait (keys present in both) and, with ``scale``
    (a trait's spread across species), ``mean_normalised_error``: the mean over
    traits of MAE / scale (1 ~ as far off as a random species)."""
    out: dict[str, float] = {}
    norm = []
    for name in pred:
        if name not in truth:
            continue
        err = float(np.mean(np.abs(np.asarray(pred[name], float) - np.asarray(truth[name], float))))
        out[name] = err
        if scale and scale.get(name):
            norm.append(err / scale[name])
    if norm:
        out["mean_normalised_error"] = float(np.mean(norm))
    return out
