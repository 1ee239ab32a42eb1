"""The evaluate stage's outputs: DVC plots (CSV), figures (PNG) and the Markdown report.

Pure writers over the ``results`` dict (what ``reports/metrics.json`` holds)
and the artefacts ``pipelines.evaluate.evaluate`` returns beside it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2p.evaluation.rows import COMPARISONS, REGISTRY, ROWS


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


PER_BARCODE = "per_barcode.parquet"  # every row's per-barcode measurements: what paired comparisons pair


def write_per_barcode(per_barcode: dict[str, dict[str, Any]], path: Path) -> Path:
    """One line per (split, barcode record, row) with that row's per-barcode measurements (score@k,
    success@k, species_accuracy): the units a later paired comparison (the promotion gate) joins on."""
    import pandas as pd

    frames = []
    for split, pb in per_barcode.items():
        for row, vals in pb["values"].items():
            frames.append(pd.DataFrame({"split": split, "processid": [str(p) for p in pb["processid"]],
                                        "species": [str(x) for x in pb["species"]], "row": row,
                                        **{m: np.asarray(v, np.float64) for m, v in vals.items()}}))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split", "processid", "row"])
    df.to_parquet(path, index=False)
    return path


def write_plots(results: dict[str, Any], art: dict[str, Any], out: Path) -> list[Path]:
    grid, dt, ds = art["densities"]
    keep = (dt > 1e-4) | (ds > 1e-4)
    files = [out / "plots" / n for n in ("densities.csv", "topk.csv", "mutation.csv", "latitude.csv")]
    _write_csv(files[0], ["score", "true_pairs", "negative_pairs"],
               [[round(float(g), 4), float(a), float(b)] for g, a, b in zip(grid[keep], dt[keep], ds[keep])])
    topk: dict[int, dict[str, float]] = {}
    for r in art["topk"]:
        topk.setdefault(r["k"], {})[f"{r['split']}_{r['row']}"] = r["success"]
    cols = sorted({c for v in topk.values() for c in v})
    _write_csv(files[1], ["k", *cols], [[k, *[topk[k].get(c) for c in cols]] for k in sorted(topk)])
    v = results["variation"]
    _write_csv(files[2], ["mutation_rate", "score"], [[r, s] for r, s in zip(v["mutation_rates"], v["score_by_rate"])])
    # without a trait reader (real data: no synthetic truth) nothing is measured; the file is still written,
    # header only, as dvc.yaml declares it an output of evaluate
    _write_csv(files[3], ["latitude", "body_size"],
               [[la, s] for la, s in zip(v.get("latitudes", []), v.get("body_size_by_latitude", []))])
    return files


def write_figures(results: dict[str, Any], art: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g2p.images import grid as image_grid

    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    grid, dt, ds = art["densities"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(grid, dt, label="true pairs")
    ax.plot(grid, ds, label="same-genus negative pairs")
    ax.axvline(results["threshold"]["value"], color="k", ls="--",
               label=f"threshold {results['threshold']['value']:.3f}")
    ax.set_xlabel("CLIBDScore (judge cosine)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["densities"] = figdir / "densities.png"
    fig.savefig(figs["densities"], dpi=110)
    plt.close(fig)

    splits = [s for s in ("seen", "unseen") if s in results]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for row in ROWS:
            pts = [(r["k"], r["success"]) for r in art["topk"] if r["split"] == split and r["row"] == row]
            ax.plot(*zip(*pts), marker="o", label=row)
        ax.set_xscale("log")
        ax.set_title(f"{split} species")
        ax.set_xlabel("k (best of k)")
        ax.set_ylabel("success@k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    figs["topk"] = figdir / "topk.png"
    fig.savefig(figs["topk"], dpi=110)
    plt.close(fig)

    v = results["variation"]
    n_pan = 2 if "latitudes" in v else 1
    fig, axes = plt.subplots(1, n_pan, figsize=(5 * n_pan, 3.2), squeeze=False)
    axes[0][0].plot(v["mutation_rates"], v["score_by_rate"], marker="o")
    axes[0][0].set_xlabel("barcode mutation rate")
    axes[0][0].set_ylabel("CLIBDScore vs the original barcode")
    if n_pan == 2:
        axes[0][1].plot(v["latitudes"], v["body_size_by_latitude"], marker="o")
        axes[0][1].set_xlabel("latitude")
        axes[0][1].set_ylabel("measured body size")
        s = v["bergmann_slope"]
        axes[0][1].set_title(f"slope {s:.4f}/deg (truth {v['bergmann_truth']})" if s is not None
                             else f"slope n/a (truth {v['bergmann_truth']})", fontsize=9)
    fig.tight_layout()
    figs["variation"] = figdir / "variation.png"
    fig.savefig(figs["variation"], dpi=110)
    plt.close(fig)

    # sample sheets: per species a row of each row's images (two of a generated row's, one of the others')
    for split, s in art["samples"].items():
        ims = s["images"]
        m = min(6, len(s["species"]))
        cols = [ims[r.name][:m, j] for r in REGISTRY for j in range(min(2 if r.source == "generated" else 1,
                                                                         ims[r.name].shape[1]))]
        sheet = torch.stack(cols, dim=1).reshape(-1, *cols[0].shape[1:])
        figs[f"samples_{split}"] = figdir / f"samples_{split}.png"
        image_grid(sheet, ncols=len(cols)).save(figs[f"samples_{split}"])
    va = art["variation"]
    mut = va["mutation"][:, :, 0]  # (B, R, 3, H, W)
    figs["vary_mutation"] = figdir / "vary_mutation.png"
    image_grid(mut.reshape(-1, *mut.shape[2:]), ncols=mut.shape[1]).save(figs["vary_mutation"])
    if "latitude" in va:
        li = va["latitude"][:, :, 0]
        figs["vary_latitude"] = figdir / "vary_latitude.png"
        image_grid(li.reshape(-1, *li.shape[2:]), ncols=li.shape[1]).save(figs["vary_latitude"])
    return figs


PAPER = {"seen": {"g2pdiffusion": {"score@1": 0.182, "success@1": 0.317, "relative_score@1": 0.356},
                  "random": {"score@1": 0.005, "success@1": 0.044}},
         "unseen": {"g2pdiffusion": {"score@1": 0.081, "success@1": 0.088}}}


def _fmt_rate(m: dict[str, float], key: str) -> str:
    return f"{100 * m[key]:.1f}% [{100 * m[key + '_low']:.1f}, {100 * m[key + '_high']:.1f}]"


def markdown_table(results: dict[str, Any], split: str, ks: list[int]) -> str:
    """One paper-style table (Table 1 / 2) for ``split``."""
    rel = [k for k in ks if f"relative_score@{k}" in results[split][ROWS[0]]]  # where ground truth is the ceiling
    head = (["Row"] + [f"score@{k}" for k in ks] + [f"relative@{k}" for k in rel]
            + [f"success@{k} [95% CI]" for k in ks] + ["species acc. [95% CI]"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        m = results[split][row]
        cells = ([row] + [f"{m[f'score@{k}']:.3f}" for k in ks] + [f"{m[f'relative_score@{k}']:.3f}" for k in rel]
                 + [_fmt_rate(m, f"success@{k}") for k in ks] + [_fmt_rate(m, "species_accuracy")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, Any], split: str, ks: list[int]) -> str:
    """The comparisons the report states in words (``COMPARISONS``), paired per barcode: difference,
    95% species-clustered interval, what may be said, and the minimum detectable difference."""
    paired = results[split].get("paired", {})
    metrics = ["species_accuracy", f"score@{max(ks)}", f"success@{max(ks)}"]
    lines = ["| Question | Rows (a - b) | Metric | a - b [95% CI] | Says | Min. detectable |",
             "|---|---|---|---|---|---|"]
    for c in COMPARISONS:
        for m in metrics:
            d = paired.get(c.name, {}).get(m)
            if d is None:
                continue
            scale, unit = (100, " pts") if not m.startswith("score") else (1, "")
            fmt = (lambda x: f"{scale * x:+.1f}") if scale == 100 else (lambda x: f"{x:+.3f}")
            lines.append(f"| {c.question} | {c.a} - {c.b} | {m} | {fmt(d['diff'])}{unit} "
                         f"[{fmt(d['low'])}, {fmt(d['high'])}] | {d['verdict']} | "
                         f"{fmt(d['mdd']).lstrip('+')}{unit} |")
    return "\n".join(lines)


def trait_group_table(traits: dict[str, Any]) -> str:
    """Normalised trait error per group [95% species-clustered interval] for every row, the floor
    (ground_truth: the reader on real images) and the ceiling (genus_oracle), then the paired verdicts."""
    groups = traits["groups"]
    names = list(next(iter(groups.values())))
    lines = ["Normalised error per trait group (0 perfect, 1 a random other species' traits; floor: "
             "`ground_truth`, the reader on real images of the same records; ceiling: `genus_oracle`, the mean "
             "traits of the genus's training records) [95% interval over species]:", "",
             "| Row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row, gs in groups.items():
        lines.append("| " + " | ".join([row] + [f"{gs[g]['mean']:.3f} [{gs[g]['low']:.3f}, {gs[g]['high']:.3f}]"
                                                 for g in names]) + " |")
    lines += ["", "| Paired (a - b) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for pair, res in traits.get("paired", {}).items():
        lines.append("| " + " | ".join([pair.replace("_vs_", " - ")] + [
            f"{res[g]['diff']:+.3f} [{res[g]['low']:+.3f}, {res[g]['high']:+.3f}] {res[g]['verdict']}"
            for g in names]) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], figs: dict[str, Path], out: Path, ks: list[int],
                 info: dict[str, Any]) -> Path:
    t = results["threshold"]
    parts = ["# Evaluation report", "",
             f"Model `{info.get('model')}`, judge `{info.get('judge')}`, trait reader `{info.get('trait_reader')}`; "
             f"eval config hash `{results['eval_config_hash'][:16]}`; {results['seconds']} s.", "",
             "Scores are the judge's CLIBDScore (cosine of image and barcode embeddings). Top-k is best of k "
             "images per barcode and place; relative score = mean score@k / mean ground-truth score@k on the "
             "same barcodes (the paper's reading: 0.182 / 0.512 = 0.356), shown only at the k where the ground "
             "truth scores highest of all rows. The ground-truth row at k is the best of k real images of the "
             "barcode's species in the split (its own record first; cycled where the split holds fewer). "
             "Intervals: 95% bootstrap resampling whole species. Species accuracy: "
             "share of each row's images (all k per barcode) whose closest species among all seen and unseen "
             "species (mean barcode embedding over the test records of both splits) is its own; chance = 1 / "
             "number of candidate species.", "",
             f"Success threshold: **{t['value']:.3f}**, fitted on {t['num_pairs']} held-out "
             f"{'val / val_unseen' if t['source'] == 'val' else 'training (no val records)'} images: the score "
             f"above which {100 * t['false_positive_rate']:.1f}% of them score with the barcode of another species "
             f"(target {100 * t['fpr_target']:.0f}%; of the same genus for {100 * t['same_genus_share']:.0f}% of "
             f"them) and {100 * t['true_positive_rate']:.1f}% with their own (true pairs mean "
             f"{t['true_pairs_mean']:.3f}, negatives {t['negative_pairs_mean']:.3f}). The paper fits CLIBD's "
             "0.255 where true and shuffled pairs' densities cross; same-genus negatives are the harder test.", "",
             f"![densities](figures/{figs['densities'].name})", ""]
    for split, title in (("seen", "Table 1: seen species (test)"), ("unseen", "Table 2: unseen species (test_unseen)")):
        if split not in results:
            continue
        s = results[split]
        j = results["judge"][split]
        parts += [f"## {title}", "",
                  f"{s['num_barcodes']} barcodes, {s['num_species']} species (species accuracy decides among "
                  f"{j.get('num_candidate_species', s['num_species'])}: chance {j['chance']:.3f}); "
                  f"judge's own species accuracy on all {j['num_images']} real test images: "
                  f"{100 * j['species_accuracy']:.1f}%. Nearest neighbour's closest training record is the "
                  f"same species for {100 * s['nearest_neighbour']['same_species_share']:.1f}% of barcodes.", "",
                  markdown_table(results, split, ks), "",
                  *[f"Relative score@{k} not shown: {s[f'relative_score@{k}']['absent']}." for k in ks
                    if isinstance(s.get(f"relative_score@{k}"), dict)], "",
                  f"Ground truth: {s.get('ground_truth_real_images', 1):.1f} distinct real images per barcode.", "",
                  f"Paired comparisons on these {s['num_barcodes']} barcodes (the same barcodes and image seeds "
                  f"in every row; intervals resample whole species, {s['num_species']} of them): a difference is "
                  "called higher or lower only when its 95% interval excludes 0; the minimum detectable "
                  "difference is what this many barcodes would usually reveal (5% two-sided, 80% power).", "",
                  paired_table(results, split, ks), ""]
        if f"samples_{split}" in figs:
            shown = ", ".join(f"{r.name}{' x2' if r.source == 'generated' else ''}" for r in REGISTRY)
            parts += [f"Samples (per species: {shown}):",
                      "", f"![samples {split}](figures/{figs[f'samples_{split}'].name})", ""]
    parts += [f"![top-k](figures/{figs['topk'].name})", ""]
    if "absent" in results.get("traits", {}):
        parts += ["## Gold standard: trait errors", "", f"Not measured: {results['traits']['absent']}.", ""]
    elif "traits" in results:
        parts += ["## Gold standard: trait errors", "",
                  "Trait reader on each row's first image vs the synthetic ground truth of the barcode's record "
                  "(hues: circular distance in turns; categoricals: error rate; others: absolute error; "
                  "`mean_normalised_error` = mean over traits of the error / the error of a random other species' "
                  "truth, so 1 = no better than another species, 0 = perfect; the ground-truth row is the "
                  "reader's own error).", ""]
        for split, rows in results["traits"].items():
            listed = [r for r in (*ROWS, "genus_oracle") if r in rows]
            names = {k for r in listed for k in rows[r]}
            show = ["mean_normalised_error"] + [n for n in ("body_size", "body_hue", "wing_hue", "wing_type",
                                                            "pattern_kind", "wing_length") if n in names]
            parts += [f"**{split}**", "", "| Row | " + " | ".join(show) + " |", "|---|" + "---|" * len(show)]
            parts += ["| " + " | ".join([row] + [f"{rows[row].get(c, float('nan')):.3f}" for c in show]) + " |"
                      for row in listed]
            base = rows.get("random_species_truth", {})
            parts += ["| (truth of a random other species) | 1.000 | "
                      + " | ".join(f"{base.get(c, float('nan')):.3f}" for c in show[1:]) + " |", ""]
            if "groups" in rows:
                parts += [trait_group_table(rows), ""]
    v = results["variation"]
    lows, highs = v.get("score_by_rate_low", v["score_by_rate"]), v.get("score_by_rate_high", v["score_by_rate"])
    parts += ["## Variation (section 4.4)", "",
              f"CLIBDScore of images generated from mutated barcodes ({v['num_barcodes']} barcodes of as many "
              f"species x {v['samples_per_barcode']} images), scored against the original barcode [95% interval "
              "over barcodes]: " + ", ".join(f"{r:.0%}: {s:.3f} [{lo:.3f}, {hi:.3f}]" for r, s, lo, hi in
                                             zip(v["mutation_rates"], v["score_by_rate"], lows, highs)) + "."]
    if "score_drop" in v:
        d = v["score_drop"]
        parts += ["", f"Score at {d['from_rate']:.0%} minus at {d['to_rate']:.0%} mutation, paired per barcode: "
                      f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['verdict']})."]

    def slope(key: str) -> str:
        if v.get(key) is None:
            return "not measurable"
        ci = f" [{v[key + '_low']:.4f}, {v[key + '_high']:.4f}] over {v[key + '_groups']} groups" \
            if key + "_low" in v else " (one pooled fit, no interval)"
        return f"{v[key]:.4f}{ci}"

    if "bergmann_slope" in v:
        parts += ["", f"Body size measured by the trait reader against latitude: fitted relative slope "
                      f"**{slope('bergmann_slope')}** per degree of |latitude| (synthetic truth's Bergmann "
                      f"coefficient {v['bergmann_truth']}; the same fit on real test images, per species: "
                      f"{slope('bergmann_slope_real_images')})."]
    elif "absent" in results.get("traits", {}):
        parts += ["", f"Body size against latitude: not measured (it needs the trait reader; "
                      f"{results['traits']['absent']})."]
    parts += controlled_sections(v)
    parts += ["", f"![variation](figures/{figs['variation'].name})", "",
              f"Mutation grid (rows: barcodes; columns: rates {v['mutation_rates']}):", "",
              f"![mutation](figures/{figs['vary_mutation'].name})", ""]
    if "vary_latitude" in figs:
        parts += [f"Latitude grid (columns: {v.get('latitudes')}):", "",
                  f"![latitude](figures/{figs['vary_latitude'].name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path




def _ci(d: dict[str, Any], key: str = "mean", fmt: str = ".4f") -> str:
    return f"{d[key]:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def controlled_sections(v: dict[str, Any]) -> list[str]:
    """The controlled variation tests (pipelines.eval_variation) in words; each sentence from its interval."""
    parts: list[str] = []
    bc = v.get("bergmann_controlled")
    if bc and "absent" not in bc:
        lon = bc["longitude"]
        r = bc["ratio_generated_to_control"]
        ratio = (f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if "ratio" in r else r.get("absent", "n/a"))
        d = bc["generated_minus_control"]
        parts += ["", "### Controlled Bergmann test", "",
                  f"{bc['species']} seen test species, each at two latitudes inside its range (the "
                  f"{bc['range_quantiles'][0]:.0%} and {bc['range_quantiles'][1]:.0%} quantiles of its training "
                  f"records' |latitude|, {bc['mean_latitude_span']:.1f} degrees apart on average) and, at its median "
                  f"latitude, two longitudes ({bc['mean_longitude_span']:.1f} degrees apart); "
                  f"{bc['samples_per_place']} images per place from shared noise. Relative body-size slope per "
                  "degree [95% interval over species]:", "",
                  "| | latitude (Bergmann) | longitude (negative control) |", "|---|---|---|",
                  f"| synthetic truth | {bc['truth']:.4f} | 0 |",
                  f"| true renders, same places (positive control) | {_ci(bc['positive_control'])} | "
                  f"{_ci(lon['positive_control'])} |",
                  f"| generated (G2PDiffusion) | {_ci(bc['generated'])} | {_ci(lon['generated'])} |", "",
                  f"Generated / positive control: {ratio}; generated minus control, paired by species: "
                  f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({d['verdict']}). The generated "
                  "longitude slope's interval "
                  + ("includes 0, as the truth does." if lon["generated_interval_includes_zero"]
                     else "excludes 0: the generator makes size depend on longitude, which the truth does not.")]
        for label, m in bc.get("melanism", {}).items():
            parts += ["", f"Thermal melanism, {label.replace('_', ' ')} ({m['species']} species): relative "
                          f"body-lightness slope per degree, truth {m['truth']:+.4f}, positive control "
                          f"{_ci(m['positive_control'], fmt='+.4f')}, generated {_ci(m['generated'], fmt='+.4f')}."]
    mc = v.get("mutation_controls")
    if mc and "absent" not in mc:
        h = mc["haplotype_invariance"]
        o, sib = h["other_haplotype_minus_own"], h["sibling_species_minus_own"]
        parts += ["", "### Haplotype invariance and interpolation toward a sibling species", "",
                  f"{mc['num_barcodes']} seen test barcodes x {mc['samples_per_barcode']} images from shared noise, "
                  "at the barcode's own place; normalised trait error against the barcode's true traits, paired "
                  "per barcode [95% interval over species]: another haplotype of the same species minus the "
                  f"barcode itself {o['diff']:+.3f} [{o['low']:+.3f}, {o['high']:+.3f}] ({o['verdict']}); "
                  f"a sibling species' barcode minus the barcode itself {sib['diff']:+.3f} "
                  f"[{sib['low']:+.3f}, {sib['high']:+.3f}] ({sib['verdict']}).", "",
                  f"Interpolation: a growing share of the {mc['mean_differing_sites']:.0f} sites (mean) where the "
                  "barcode differs from a sibling species' (same genus, aligned on the template) set to the "
                  "sibling's base:", "", "| share of sites | error vs own traits | error vs sibling's | "
                  "images closer to the sibling |", "|---|---|---|---|"]
        parts += [f"| {x['fraction']:.0%} | {_ci(x['error_vs_own'], fmt='.3f')} | "
                  f"{_ci(x['error_vs_sibling'], fmt='.3f')} | {_ci(x['share_closer_to_sibling'], fmt='.0%')} |"
                  for x in mc["interpolation"]["steps"]]
        sw = mc["interpolation"]["median_switch_fraction"]
        parts += ["", "Median share of sites at which the traits switch to the sibling's: "
                  + (f"{sw:.0%}" if sw is not None else "never") + f"; barcodes that never switch: "
                  f"{mc['interpolation']['share_never_switched']:.0%}."]
    return parts
