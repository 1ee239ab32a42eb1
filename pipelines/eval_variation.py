"""The evaluate stage's section 4.4 (the paper's variation experiments), with intervals.

CLIBDScore of images generated from mutated barcodes against the original barcode, by mutation rate, and
body size read by the trait reader against latitude (Bergmann's rule), on ``evaluate.vary_barcodes`` seen
barcodes (one per species) x ``evaluate.vary_samples`` images; every variant of a barcode shares its
starting noise (:func:`g2p.variation.variation_images`). Intervals resample barcodes (species).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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


# ----------------------------------------------------------------------------
# controlled tests (issue 15 part 6): Bergmann with positive and negative controls; haplotype
# invariance and interpolation toward a sibling species
# ----------------------------------------------------------------------------

RANGE_QUANTILES = (0.1, 0.9)  # "inside the species' range": these quantiles of its training records' places


def species_places(train: Arrays, names: list[str]) -> dict[str, dict[str, float]]:
    """Per species with at least 2 placed training records and a latitude spread of at least 1 degree:
    ``lat_lo`` / ``lat_hi`` (signed, at the RANGE_QUANTILES of |lat|, on the side of the median latitude),
    ``lat_mid``, ``lon_lo`` / ``lon_hi`` (quantiles of longitude) and ``lon_mid``."""
    sp = np.asarray(train.species, dtype=object)
    placed = train.has_place.numpy().astype(bool)
    lat, lon = train.lat.numpy().astype(np.float64), train.lon.numpy().astype(np.float64)
    out = {}
    for s in names:
        m = (sp == s) & placed
        if m.sum() < 2:
            continue
        side = 1.0 if np.median(lat[m]) >= 0 else -1.0
        lo, hi = np.quantile(np.abs(lat[m]), RANGE_QUANTILES)
        llo, lhi = np.quantile(lon[m], RANGE_QUANTILES)
        if hi - lo < 1.0 or lhi - llo < 1.0:
            continue
        out[s] = {"lat_lo": side * lo, "lat_hi": side * hi, "lat_mid": float(np.median(lat[m])),
                  "lon_lo": llo, "lon_hi": lhi, "lon_mid": float(np.median(lon[m]))}
    return out


def _rel_slope(y_lo: np.ndarray, y_hi: np.ndarray, x_lo: np.ndarray, x_hi: np.ndarray) -> np.ndarray:
    """Relative change per unit of x between two places: (y_hi - y_lo) / mean(y) / (x_hi - x_lo)."""
    return (y_hi - y_lo) / ((y_hi + y_lo) / 2.0) / (x_hi - x_lo)


def controlled_bergmann(pipe, reader, arr: Arrays, train: Arrays, truth, data_cfg, ecfg, progress,
                        **knobs) -> dict[str, Any]:
    """Body size (and body lightness, thermal melanism) read from images of each seen test species at two
    latitudes inside its range and, at its median latitude, two longitudes (the negative control: the truth
    does not depend on longitude). ``bergmann_samples`` images per species and place share their noise.
    The positive control: true renders of the same species at the same places (its test records moved
    there, :func:`g2p.data.records.moved_record`), read by the same reader. Every slope is relative, per
    degree; intervals resample species."""
    from g2p.data import traits as T
    from g2p.data.prior import render_record
    from g2p.data.records import family_melanism, moved_record
    from g2p.pipeline import generate_uint8
    from pipelines.evaluate import select_barcodes

    reps, seed, n = ecfg.bootstrap_reps, ecfg.seed, ecfg.bergmann_samples
    first = select_barcodes(arr.species, 1)
    places = species_places(train, [str(arr.species[i]) for i in first])
    first = [int(i) for i in first if str(arr.species[i]) in places]
    if ecfg.bergmann_species:
        first = first[: ecfg.bergmann_species]
    if len(first) < 2:
        return {"absent": f"{len(first)} seen test species have a latitude range in train (need 2)"}
    names = [str(arr.species[i]) for i in first]
    rows = truth.loc[[str(arr.processid[i]) for i in first]]
    expected = T.size_multiplier(rows["lat"].to_numpy(np.float64), data_cfg)
    if not np.allclose(rows["size_multiplier"].to_numpy(np.float64), expected, rtol=1e-4):
        raise ValueError(f"data.bergmann_coefficient: {data_cfg.bergmann_coefficient!r} did not make this ground "
                         "truth (its size_multiplier differs); evaluate with the params that synthesised the data")
    melanic_of = family_melanism(truth)
    keys = ("lat_lo", "lat_hi", "lon_lo", "lon_hi")
    pl = {k: np.array([places[s][k] for s in names]) for k in (*keys, "lat_mid", "lon_mid")}
    at = {"lat_lo": (pl["lat_lo"], pl["lon_mid"]), "lat_hi": (pl["lat_hi"], pl["lon_mid"]),
          "lon_lo": (pl["lat_mid"], pl["lon_lo"]), "lon_hi": (pl["lat_mid"], pl["lon_hi"])}
    b = len(first)
    bar = progress_bar(b * len(keys) * n, "evaluate: Bergmann test", progress)
    items = [(arr.barcode[i], float(at[k][0][s]), float(at[k][1][s]), s) for s, i in enumerate(first) for k in keys]
    imgs = generate_uint8(pipe, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], n,
                          seed + 17, 64, bar.update, seed_index=[x[3] for x in items], **knobs)
    bar.close()
    size = imgs.shape[-1]
    gen = reader.predict(imgs.reshape(-1, *imgs.shape[2:]))
    # the positive control: each species' test records moved to the same places, n renders per place with
    # the same sex and nuisance at every place (drawn once per species), read by the same reader
    renders = np.empty((b, len(keys), n, 3, size, size), dtype=np.uint8)
    sp_all = np.asarray(arr.species, dtype=object)
    for s, name in enumerate(names):
        recs = truth.loc[[str(p) for p in arr.processid[sp_all == name]]]
        rng = np.random.default_rng([seed, 23, s])
        nuis = T.nuisance(n, data_cfg, rng)
        sexes = rng.integers(0, 2, n)
        melanic = melanic_of[int(recs["family_id"].iloc[0])]
        for j in range(n):
            row = recs.iloc[j % len(recs)]
            for q, k in enumerate(keys):
                p = moved_record(row, data_cfg, float(at[k][0][s]), melanic, sex=int(sexes[j]),
                                 nuisance={m: v[j] for m, v in nuis.items()})
                p["damage"] = 0.0  # intact specimens: the control measures the environment, not damage
                renders[s, q, j] = render_record(p, data_cfg.image_size, size)
    ctl = reader.predict(torch.from_numpy(renders.reshape(-1, 3, size, size)))

    def per_place(read: dict[str, np.ndarray], trait: str) -> dict[str, np.ndarray]:
        v = read[trait].reshape(b, len(keys), n).mean(axis=2)
        return {k: v[:, q] for q, k in enumerate(keys)}

    lat_x = (np.abs(pl["lat_lo"]), np.abs(pl["lat_hi"]))
    out: dict[str, Any] = {"species": b, "samples_per_place": n, "range_quantiles": list(RANGE_QUANTILES),
                           "mean_latitude_span": float(np.mean(lat_x[1] - lat_x[0])),
                           "mean_longitude_span": float(np.mean(pl["lon_hi"] - pl["lon_lo"]))}
    c = data_cfg.bergmann_coefficient
    truth_slope = _rel_slope(1 + c * lat_x[0], 1 + c * lat_x[1], *lat_x)
    g, k_ = per_place(gen, "body_size"), per_place(ctl, "body_size")
    gs, cs = _rel_slope(g["lat_lo"], g["lat_hi"], *lat_x), _rel_slope(k_["lat_lo"], k_["lat_hi"], *lat_x)
    out["truth"] = float(truth_slope.mean())
    out["generated"] = M.clustered_mean(gs, names, reps, seed)
    out["positive_control"] = M.clustered_mean(cs, names, reps, seed)
    d = M.paired_difference(gs, cs, names, reps, seed)
    out["generated_minus_control"] = {**d, "verdict": M.verdict(d)}
    try:
        out["ratio_generated_to_control"] = M.ratio_of_means(gs, cs, names, reps, seed)
    except ValueError as e:
        out["ratio_generated_to_control"] = {"absent": str(e)}
    lon_x = (pl["lon_lo"], pl["lon_hi"])
    lg, lc = _rel_slope(g["lon_lo"], g["lon_hi"], *lon_x), _rel_slope(k_["lon_lo"], k_["lon_hi"], *lon_x)
    out["longitude"] = {"truth": 0.0, "generated": M.clustered_mean(lg, names, reps, seed),
                        "positive_control": M.clustered_mean(lc, names, reps, seed)}
    out["longitude"]["generated_interval_includes_zero"] = bool(
        out["longitude"]["generated"]["low"] <= 0.0 <= out["longitude"]["generated"]["high"])
    # thermal melanism: body lightness against |lat|, melanic families against the others
    if "body_light" in gen:
        fam = np.array([melanic_of[int(f)] for f in rows["family_id"]])
        gl, cl = per_place(gen, "body_light"), per_place(ctl, "body_light")
        gls, cls = _rel_slope(gl["lat_lo"], gl["lat_hi"], *lat_x), _rel_slope(cl["lat_lo"], cl["lat_hi"], *lat_x)
        m = data_cfg.melanism_coefficient
        tl = _rel_slope(1 - m * lat_x[0], 1 - m * lat_x[1], *lat_x)
        mel = {}
        for label, mask in (("melanic_families", fam), ("other_families", ~fam)):
            if mask.sum() >= 2:
                ids = np.asarray(names, dtype=object)[mask]
                mel[label] = {"species": int(mask.sum()),
                              "truth": float(tl[mask].mean()) if label == "melanic_families" else 0.0,
                              "generated": M.clustered_mean(gls[mask], ids, reps, seed),
                              "positive_control": M.clustered_mean(cls[mask], ids, reps, seed)}
        out["melanism"] = mel
    return out


def _aligned_mix(a: str, start_a: int, c: str, start_c: int, fraction: float, seed: int) -> tuple[str, int]:
    """Barcode ``a`` with ``fraction`` of the sites where it differs from ``c`` (aligned on the template by
    the reads' start offsets, N's left alone) set to ``c``'s base; the sites are taken in one fixed random
    order, so the steps are nested. Returns the mix and how many sites differ."""
    sa = np.frombuffer(a.encode(), dtype=np.uint8).copy()
    sc = np.frombuffer(c.encode(), dtype=np.uint8)
    p = np.arange(len(sa))
    q = p + start_a - start_c
    ok = (q >= 0) & (q < len(sc))
    p, q = p[ok], q[ok]
    n_base = ord("N")
    diff = (sa[p] != sc[q]) & (sa[p] != n_base) & (sc[q] != n_base)
    p, q = p[diff], q[diff]
    order = np.random.default_rng(seed).permutation(len(p))
    take = order[: int(round(fraction * len(p)))]
    sa[p[take]] = sc[q[take]]
    return sa.tobytes().decode(), int(len(p))


def mutation_controls(pipe, reader, arr: Arrays, truth, ecfg, baseline: dict[str, float], progress,
                      **knobs) -> dict[str, Any]:
    """Two controlled mutation tests on ``vary_barcodes`` seen test barcodes (one per species), all images
    of a barcode from shared noise and at its own place, read by the trait reader and scored against the
    barcode's true traits (normalised error, all traits):

    - haplotype invariance: another haplotype of the same species (a test record with a different
      barcode) should give the same traits: paired error difference to the barcode's own images, next to
      the same difference for a sibling species' barcode (same genus);
    - interpolation: the barcode with a growing share of the sites where it differs from the sibling's
      (aligned on the template) set to the sibling's base; per step, the error against the barcode's
      traits and against the sibling's, and where the traits switch (the first step closer to the sibling).
    """
    from g2p.evaluation.traits import group_errors
    from g2p.pipeline import generate_uint8
    from pipelines.evaluate import select_barcodes, true_traits

    reps, seed, n = ecfg.bootstrap_reps, ecfg.seed, ecfg.vary_samples
    steps = [float(f) for f in ecfg.interpolation_steps]
    sp = np.asarray(arr.species, dtype=object)
    pid = np.asarray(arr.processid).astype(str)
    t = truth.loc[pid]
    genus, start, hap_id = t["genus_id"].to_numpy(), t["read_start"].to_numpy(), t["haplotype_id"].to_numpy()
    chosen = []
    for i in select_barcodes(sp, 1):
        same = np.flatnonzero((sp == sp[i]) & (hap_id != hap_id[i]))
        sib = np.flatnonzero((genus == genus[i]) & (sp != sp[i]))
        if len(same) and len(sib):
            chosen.append((int(i), int(same[0]), int(sib[0])))
        if len(chosen) == ecfg.vary_barcodes:
            break
    if len(chosen) < 2:
        return {"absent": f"{len(chosen)} seen test barcodes have another haplotype and a sibling species (need 2)"}
    items, n_sites = [], []
    for k, (i, h, c) in enumerate(chosen):
        mixes = []
        for f in steps:
            mix, nd = _aligned_mix(arr.barcode[i], int(start[i]), arr.barcode[c], int(start[c]), f, seed + k)
            mixes.append(mix)
        n_sites.append(nd)
        place = (float(arr.lat[i]) if arr.has_place[i] else None, float(arr.lon[i]) if arr.has_place[i] else None)
        items += [(arr.barcode[h], *place, k)] + [(m, *place, k) for m in mixes]
    bar = progress_bar(len(items) * n, "evaluate: mutation controls", progress)
    imgs = generate_uint8(pipe, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], n,
                          seed + 29, 64, bar.update, seed_index=[x[3] for x in items], **knobs)
    bar.close()
    b, v = len(chosen), len(steps) + 1
    read = reader.predict(imgs.reshape(-1, *imgs.shape[2:]))
    own = true_traits(truth, np.array([pid[i] for i, _, _ in chosen]))
    sib = true_traits(truth, np.array([pid[c] for _, _, c in chosen]))

    def err(against: dict[str, np.ndarray]) -> np.ndarray:  # (B, V): mean over samples of the normalised error
        rep = {k: np.repeat(x, v * n) for k, x in against.items()}
        return group_errors(read, rep, baseline)["all"].reshape(b, v, n).mean(axis=2)

    e_own, e_sib = err(own), err(sib)
    names = np.array([sp[i] for i, _, _ in chosen], dtype=object)
    base = e_own[:, 1]  # step 0: the barcode itself
    hap = M.paired_difference(e_own[:, 0], base, names, reps, seed)
    sibling = M.paired_difference(e_own[:, -1], base, names, reps, seed)
    out: dict[str, Any] = {"num_barcodes": b, "samples_per_barcode": n,
                           "mean_differing_sites": float(np.mean(n_sites)),
                           "haplotype_invariance": {
                               "other_haplotype_minus_own": {**hap, "verdict": M.verdict(hap)},
                               "sibling_species_minus_own": {**sibling, "verdict": M.verdict(sibling)}}}
    curve = []
    for q, f in enumerate(steps):
        closer = (e_sib[:, q + 1] < e_own[:, q + 1]).astype(np.float64)
        curve.append({"fraction": f, "error_vs_own": M.clustered_mean(e_own[:, q + 1], names, reps, seed),
                      "error_vs_sibling": M.clustered_mean(e_sib[:, q + 1], names, reps, seed),
                      "share_closer_to_sibling": M.clustered_mean(closer, names, reps, seed)})
    switched = e_sib[:, 1:] < e_own[:, 1:]
    first = np.where(switched.any(axis=1), np.array(steps)[switched.argmax(axis=1)], np.nan)
    out["interpolation"] = {"steps": curve, "median_switch_fraction":
                            float(np.nanmedian(first)) if np.isfinite(first).any() else None,
                            "share_never_switched": float(np.isnan(first).mean())}
    return out
