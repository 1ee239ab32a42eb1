"""The evaluate stage's section 4.4 (the paper's variation experiments), with intervals.

CLIBDScore of images generated from mutated barcodes against the original barcode, by mutation rate, and
body size read by the trait reader against latitude (Bergmann's rule), on ``evaluate.vary_barcodes`` seen
barcodes (one per species) x ``evaluate.vary_samples`` images; every variant of a barcode shares its
starting noise (:func:`g2p.variation.variation_images`). Intervals resample barcodes (species).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from g2p.data.dataset import Arrays
from g2p.evaluation import metrics as M
from pipelines.eval_pool import progress_bar


def variation(pipe, judge, arr: Arrays, ecfg, trait_reader, bergmann_truth, progress,
              real_sizes: np.ndarray | None = None, **knobs):
    """Section 4.4 (:func:`g2p.variation.variation_images`): CLIBDScore against mutation rate; measured body
    size against latitude. Every variant of a barcode shares its starting noise."""
    from g2p.variation import variation_images
    from pipelines.evaluate import select_barcodes  # which records are evaluated: the stage's one rule

    sel = select_barcodes(arr.species, 1)[: ecfg.vary_barcodes]
    barcodes = [arr.barcode[i] for i in sel]
    lat = [float(arr.lat[i]) if arr.has_place[i] else None for i in sel]
    lon = [float(arr.lon[i]) if arr.has_place[i] else None for i in sel]
    n, rates = ecfg.vary_samples, list(ecfg.mutation_rates)
    with_lat = trait_reader is not None and "body_size" in getattr(trait_reader, "TARGETS", ())
    lats = list(ecfg.latitudes) if with_lat else []
    bar = progress_bar(len(sel) * n * (len(rates) + len(lats)), "evaluate: variation", progress)
    v = variation_images(pipe, barcodes, lat, lon, rates=rates, sweep=lats, num_images=n, seed=ecfg.seed,
                         on_images=bar.update, **knobs)
    mut = v.mutation  # (B, R, n, 3, H, W)
    b, r = len(barcodes), len(rates)
    bc = judge.embed_barcodes(barcodes)
    emb = judge.embed_images(mut.reshape(b * r * n, *mut.shape[3:])).reshape(b, r, n, -1)
    score = (emb * bc[:, None, None, :]).sum(-1).numpy()  # against the *original* barcode
    per = score.mean(axis=2)  # (B, R): one value per barcode (each of its own species) and rate
    species = np.asarray(arr.species[sel], dtype=object)
    reps, seed = ecfg.bootstrap_reps, ecfg.seed
    cis = [M.clustered_mean(per[:, j], species, reps, seed) for j in range(r)]
    out: dict[str, Any] = {"mutation_rates": rates, "score_by_rate": [c["mean"] for c in cis],
                           "score_by_rate_low": [c["low"] for c in cis], "score_by_rate_high": [c["high"] for c in cis],
                           "num_barcodes": int(len(sel)), "samples_per_barcode": int(n)}
    if r > 1:  # does the score fall with mutation? the unmutated barcode against the most mutated, paired
        d = M.paired_difference(per[:, 0], per[:, -1], species, reps, seed)
        out["score_drop"] = {**d, "from_rate": rates[0], "to_rate": rates[-1], "verdict": M.verdict(d)}
    art: dict[str, Any] = {"mutation": mut, "rates": rates}
    if with_lat:
        li = v.latitude  # (B, L, n, 3, H, W)
        size = trait_reader.predict(li.reshape(-1, *li.shape[3:]))["body_size"].reshape(b, len(lats), n)
        abs_lat = np.broadcast_to(np.abs(np.asarray(lats))[None, :, None], size.shape)
        group = np.broadcast_to(np.arange(b)[:, None, None], size.shape)
        out["latitudes"] = lats
        out["body_size_by_latitude"] = [float(x) for x in size.mean(axis=(0, 2))]
        out.update(_slope_with_ci("bergmann_slope", abs_lat.ravel(), size.ravel(), group.ravel(), reps, seed))
        # the same fit on real test images: what the reader sees when the truth is there
        real = real_sizes if real_sizes is not None else trait_reader.predict(arr.images)["body_size"]
        sp = np.unique(arr.species, return_inverse=True)[1]
        out.update(_slope_with_ci("bergmann_slope_real_images", np.abs(arr.lat.numpy()), real, sp, reps, seed))
        art["latitude"] = li
        art["lats"] = lats
    out["bergmann_truth"] = bergmann_truth
    bar.close()
    return out, art


def _slope_with_ci(key: str, abs_lat: np.ndarray, size: np.ndarray, group: np.ndarray, reps: int,
                   seed: int) -> dict[str, Any]:
    """``{key: mean relative slope over groups, key_low/_high: 95% interval resampling groups (barcodes or
    species), key_groups: how many}``; where no group has two latitudes, one pooled fit without an interval;
    ``{key: None}`` if neither is possible (e.g. a reader that reads non-positive sizes)."""
    try:
        ids, slopes = M.bergmann_slopes(abs_lat, size, group)
    except ValueError:
        try:
            return {key: M.bergmann_slope(abs_lat, size, None)}
        except ValueError:
            return {key: None}
    c = M.clustered_mean(slopes, ids.astype(str), reps, seed)
    return {key: c["mean"], f"{key}_low": c["low"], f"{key}_high": c["high"], f"{key}_groups": int(len(ids))}
