"""The evaluate stage end to end on a tiny synthetic root, an untrained tiny generator, judge and trait reader.

Untrained models give meaningless numbers; this checks the stage's contract:
the shape of ``metrics.json`` (every split, row and k), the invariants that
hold whatever the models (ground truth at relative score 1, best-of-k never
falling with k, intervals around their estimates), the report files, the
DVC plots, and the nested MLflow run on a real sqlite store.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from g2p.data.layout import METADATA_RELPATH, TRUTH_RELPATH
from g2p.evaluation import ROWS
from g2p.evaluation.rows import COMPARISONS
from tests.tiny_diffusion import tiny_config

pytestmark = pytest.mark.integration

CFG = tiny_config()  # the tiny preset with the smallest diffusion parts (16 px): seconds per evaluation


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from g2p.judge import Judge
    from g2p.model import G2PDiffusion
    from g2p.trait_reader import TraitReader
    from pipelines.ray_train import load_data, save_arrays

    tmp = tmp_path_factory.mktemp("evaluate")
    root = tmp / "data"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "synth", "--out", str(root), "--preset", "tiny",
                    "--quiet"], check=True, capture_output=True)
    meta = pd.read_csv(root / METADATA_RELPATH, dtype=str)
    meta.to_parquet(tmp / "valid.parquet")  # stands in for the validate stage's output (same columns)
    size = CFG.vae.image_size
    save_arrays(load_data(root, ["train"], size), tmp / "train.safetensors")
    save_arrays(load_data(root, ["test"], size), tmp / "test.safetensors")
    torch.manual_seed(0)
    model = G2PDiffusion(CFG)
    model.add_lora()
    model.save_pretrained(tmp / "g2pdiffusion")
    Judge(CFG.judge).save_pretrained(tmp / "judge")
    reader = TraitReader(CFG.trait_reader)
    reader.save_pretrained(tmp / "trait_reader")
    return {"tmp": tmp, "root": root}


def test_evaluate_stage_writes_metrics_report_plots_and_mlflow_run(setup, monkeypatch) -> None:
    from mlflow import MlflowClient

    from pipelines import evaluate

    tmp, root = setup["tmp"], setup["root"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("G2P_PIPELINE_RUN_ID", raising=False)
    out = tmp / "reports"
    t0 = time.time()
    res = evaluate.run(model=str(tmp / "g2pdiffusion"), judge=str(tmp / "judge"),
                       trait_reader=str(tmp / "trait_reader"), train=str(tmp / "train.safetensors"),
                       test=str(tmp / "test.safetensors"), valid=str(tmp / "valid.parquet"), root=str(root),
                       truth=str(root / TRUTH_RELPATH), params=str(tmp / "no-params.yaml"), out=str(out),
                       progress=False)
    print(f"evaluate.run: {time.time() - t0:.1f} s")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(res))
    ecfg = CFG.evaluate
    ks = sorted(ecfg.ks)
    truth = pd.read_parquet(root / TRUTH_RELPATH)
    for split, name in (("seen", "test"), ("unseen", "test_unseen")):
        s = metrics[split]
        n_species = truth.loc[truth["split"] == name, "species_id"].nunique()
        assert s["num_species"] == n_species and s["num_barcodes"] == n_species  # one barcode per species
        for row in ROWS:
            m = s[row]
            for k in ks:
                # relative scores only where the ground truth is the ceiling; elsewhere the reason
                rel = ("relative_score",) if f"relative_score@{k}" not in s else ()
                assert rel or "not the ceiling" in s[f"relative_score@{k}"]["absent"]
                for key in ("score", "success", *rel):
                    assert f"{key}@{k}" in m and f"{key}@{k}_low" in m and f"{key}@{k}_high" in m
                assert m[f"success@{k}_low"] <= m[f"success@{k}"] <= m[f"success@{k}_high"]
                assert -1.0 <= m[f"score@{k}"] <= 1.0
            assert 0.0 <= m["species_accuracy_low"] <= m["species_accuracy"] <= m["species_accuracy_high"] <= 1.0
            assert all(m[f"score@{a}"] <= m[f"score@{b}"] + 1e-9 for a, b in zip(ks, ks[1:]))
        gt = s["ground_truth"]
        assert all(gt[f"relative_score@{k}"] == pytest.approx(1.0) for k in ks if f"relative_score@{k}" in gt)
        assert 1 <= s["ground_truth_real_images"] <= ks[-1]  # up to k real images of the species
        assert 0.0 <= metrics["judge"][split]["species_accuracy"] <= 1.0
        assert set(ROWS) <= set(metrics["traits"][split])
        assert metrics["traits"][split]["g2pdiffusion"]["body_size"] >= 0.0
        # per trait group: every row, the floor (ground truth) and the ceiling (genus oracle), clustered intervals
        groups = metrics["traits"][split]["groups"]
        assert set(groups) == {*ROWS, "genus_oracle"}
        for row, gs in groups.items():
            assert set(gs) == {"colour", "pattern", "shape", "size", "all"}
            assert all(g["low"] <= g["mean"] <= g["high"] for g in gs.values())
        d = metrics["traits"][split]["paired"]["g2pdiffusion_vs_genus_oracle"]["colour"]
        gen, oracle = groups["g2pdiffusion"]["colour"]["mean"], groups["genus_oracle"]["colour"]["mean"]
        assert d["diff"] == pytest.approx(gen - oracle)
        # every comparison stated in words is paired: its difference is the rows' difference on the same barcodes
        for c in COMPARISONS:
            for key in [f"score@{k}" for k in ks] + [f"success@{k}" for k in ks] + ["species_accuracy"]:
                d = s["paired"][c.name][key]
                assert d["diff"] == pytest.approx(s[c.a][key] - s[c.b][key], abs=1e-9)
                assert d["low"] <= d["diff"] <= d["high"] and d["n_barcodes"] == s["num_barcodes"]
                assert d["verdict"] == ("higher" if d["low"] > 0 else "lower" if d["high"] < 0
                                        else "no detectable difference")
        per = pd.read_parquet(out / "per_barcode.parquet").query("split == @split")
        assert len(per) == len(ROWS) * s["num_barcodes"]
        for row in ROWS:
            assert per.query("row == @row")[f"success@{ks[-1]}"].mean() == pytest.approx(s[row][f"success@{ks[-1]}"])
    v = metrics["variation"]
    assert len(v["score_by_rate"]) == len(ecfg.mutation_rates)
    assert len(v["body_size_by_latitude"]) == len(ecfg.latitudes)
    assert v["bergmann_truth"] == CFG.data.bergmann_coefficient and "bergmann_slope" in v
    # every variation figure carries an interval over barcodes; the drop with mutation is paired
    assert all(lo <= s <= hi for s, lo, hi in zip(v["score_by_rate"], v["score_by_rate_low"], v["score_by_rate_high"]))
    d = v["score_drop"]
    assert d["diff"] == pytest.approx(v["score_by_rate"][0] - v["score_by_rate"][-1]) and d["low"] <= d["high"]
    if v["bergmann_slope"] is not None and "bergmann_slope_low" in v:
        assert v["bergmann_slope_low"] <= v["bergmann_slope"] <= v["bergmann_slope_high"]
    # the controlled Bergmann test: generated against true renders at the same places, longitude as the control
    bc = v["bergmann_controlled"]
    assert bc["species"] >= 2 and bc["samples_per_place"] == ecfg.bergmann_samples
    assert bc["truth"] == pytest.approx(CFG.data.bergmann_coefficient, rel=0.5)
    for part in (bc["generated"], bc["positive_control"], bc["longitude"]["generated"]):
        assert part["low"] <= part["mean"] <= part["high"]
    gen_minus_control = bc["generated"]["mean"] - bc["positive_control"]["mean"]
    assert bc["generated_minus_control"]["diff"] == pytest.approx(gen_minus_control)
    assert bc["longitude"]["generated_interval_includes_zero"] == (
        bc["longitude"]["generated"]["low"] <= 0 <= bc["longitude"]["generated"]["high"])
    # haplotype invariance and the interpolation toward a sibling species, paired per barcode
    mc = v["mutation_controls"]
    assert set(mc["haplotype_invariance"]) == {"other_haplotype_minus_own", "sibling_species_minus_own"}
    assert mc["num_barcodes"] >= 2 and mc["mean_differing_sites"] > 0
    steps = mc["interpolation"]["steps"]
    assert [x["fraction"] for x in steps] == list(ecfg.interpolation_steps)
    assert all(0 <= x["share_closer_to_sibling"]["mean"] <= 1 for x in steps)
    # metrics.json's comparisons and the reader's own error
    for split in ("seen", "unseen"):
        c = metrics["comparisons"][split]["g2pdiffusion_vs_nearest_neighbour"]
        assert {"species_accuracy", "score@1", "trait_error"} <= set(c)
        assert c["score@1"]["diff"] == pytest.approx(metrics[split]["paired"]["g2pdiffusion_vs_nearest_neighbour"]
                                                     ["score@1"]["diff"])
        assert c["trait_error"]["n_species"] == metrics[split]["num_species"]
        assert metrics["reader"][split] == metrics["traits"][split]["ground_truth"]["mean_normalised_error"]
    assert "g2pdiffusion_vs_no_aligner" in metrics["comparisons"]["seen"]
    t = metrics["threshold"]  # fitted on the held-out val images against same-genus negatives, at 5% FPR
    assert -1.0 < t["value"] < 1.0 and t["source"] == "val" and t["false_positive_rate"] <= 0.05
    assert t["num_pairs"] == truth["split"].isin(["val", "val_unseen"]).sum() and 0 < t["same_genus_share"] <= 1
    assert len(metrics["eval_config_hash"]) == 64

    report = (out / "report.md").read_text()
    assert "Table 1: seen species" in report and "Table 2: unseen species" in report
    assert report.count("Paired comparisons on these") == 2 and "| Does the aligner's guidance help? |" in report
    for row in ROWS:
        assert f"| {row} |" in report
    for f in ("densities", "topk", "variation", "samples_seen", "samples_unseen", "vary_mutation", "vary_latitude"):
        assert (out / "figures" / f"{f}.png").stat().st_size > 0
        assert f"figures/{f}.png" in report
    for f in ("densities", "topk", "mutation", "latitude"):
        assert len((out / "plots" / f"{f}.csv").read_text().splitlines()) >= 2
    assert pd.read_csv(out / "plots" / "topk.csv")["k"].tolist() == ks

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("g2p").experiment_id],
                              filter_string="tags.`g2p.stage` = 'evaluate'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["g2p.eval_config_hash"] == metrics["eval_config_hash"]
    assert run.data.metrics[f"seen.g2pdiffusion.success_at_{ks[0]}"] == pytest.approx(
        metrics["seen"]["g2pdiffusion"][f"success@{ks[0]}"])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert "reports/metrics.json" in names and "reports/report.md" in names


def test_vary_grids_share_noise_and_cli_writes_them(setup, capsys) -> None:
    from PIL import Image

    from g2p.pipeline import generate_uint8, load_pipeline
    from g2p.variation import variation_images
    from pipelines.cli import main
    from pipelines.ray_train import load_data

    tmp = setup["tmp"]
    pipe = load_pipeline(str(tmp / "g2pdiffusion"))
    test = load_data(tmp / "test.safetensors", ["test"], CFG.vae.image_size)
    bc = test.barcode[:2]
    v = variation_images(pipe, bc, [10.0, 20.0], [5.0, 6.0], rates=[0.0, 0.5], sweep=[0.0, 60.0], seed=3,
                         num_inference_steps=2)
    assert v.mutation.shape[:3] == (2, 2, 1) and v.mutants[0][0] == bc[0] and v.mutants[0][1] != bc[0]
    assert v.latitude.shape[:3] == (2, 2, 1)
    # rate 0 is the unmutated barcode from the same noise: exactly the plain generation
    plain = generate_uint8(pipe, bc, [10.0, 20.0], [5.0, 6.0], 1, seed=3, num_inference_steps=2)
    assert torch.equal(v.mutation[:, 0], plain)
    # a latitude variant differs from the rate-0 image only by its condition (same noise)
    at_own = variation_images(pipe, bc[:1], [10.0], [5.0], rates=[0.0], sweep=[10.0], seed=3,
                              num_inference_steps=2)
    assert torch.equal(at_own.latitude[0, 0], at_own.mutation[0, 0])
    with pytest.raises(ValueError, match="latitudes"):
        variation_images(pipe, bc[:1], [None], [5.0], sweep=[95.0])

    out = tmp / "vary"
    assert main(["vary", "--model", str(tmp / "g2pdiffusion"), "--judge", str(tmp / "judge"), "--barcode", bc[0],
                 "--lat", "10", "--lon", "5", "--rates", "0", "0.2", "0.5", "--latitudes", "0", "60",
                 "--n", "1", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["score_by_rate"]) == 3
    s = CFG.vae.image_size
    assert Image.open(out / "mutation.png").size[0] > 3 * s and Image.open(out / "latitude.png").size[0] > 2 * s
    assert main(["vary", "--model", str(tmp / "g2pdiffusion"), "--processid", "nope",
                 "--valid", str(tmp / "valid.parquet"), "--out", str(out)]) == 2
    assert "--processid" in capsys.readouterr().err


def test_without_synthetic_truth_the_gold_standard_is_absent_with_its_reason(setup, tmp_path: Path) -> None:
    """A real BIOSCAN-5M root has no synthetic ground truth: train_trait_reader leaves a folder saying why,
    and evaluate runs on, reporting the truth-based metrics as absent with that reason."""
    from pipelines import evaluate
    from pipelines.train_judge import absent_reason, skip_trait_reader

    tmp, root = setup["tmp"], setup["root"]
    missing = tmp_path / "no" / "synthetic_ground_truth.parquet"
    reader = tmp_path / "trait_reader"
    summary = skip_trait_reader(reader, missing, tmp_path / "m" / "train_trait_reader.json",
                                tmp_path / "p" / "train_trait_reader.csv")
    assert summary["skipped"] and str(missing) in summary["reason"]
    assert absent_reason(reader) == summary["reason"] and (tmp_path / "p" / "train_trait_reader.csv").exists()
    res = evaluate.run(model=str(tmp / "g2pdiffusion"), judge=str(tmp / "judge"), trait_reader=str(reader),
                       train=str(tmp / "train.safetensors"), test=str(tmp / "test.safetensors"),
                       valid=str(tmp / "valid.parquet"), root=str(root), truth=str(missing),
                       params=str(tmp / "no-params.yaml"), out=str(tmp_path / "reports"), mlflow=False,
                       progress=False)
    assert res["traits"] == {"absent": summary["reason"]}
    assert "bergmann_slope" not in res["variation"] and res["variation"]["bergmann_truth"] is None
    assert "g2pdiffusion" in res["seen"]  # everything else is measured as usual
    assert f"Not measured: {summary['reason']}" in (tmp_path / "reports" / "report.md").read_text()


def test_same_seed_same_metrics_equal_to_the_definitions_computed_in_process(setup) -> None:
    """Generation, random draws and bootstrap are seeded: a second run gives the same numbers. And the rows
    graded in Ray actors give the numbers of the definitions computed here on the same images: generated
    images from image_seed(seed, i, j), best of k of judge cosines, ground truth as reference, nearest
    neighbour by k-mer L1, species accuracy against the split's prototypes."""
    import ray

    from g2p.evaluation import metrics as M
    from g2p.judge import Judge
    from g2p.pipeline import generate_uint8, load_pipeline
    from pipelines import evaluate
    from pipelines.ray_train import ensure_ray

    tmp, root = setup["tmp"], setup["root"]
    data = evaluate.load_eval_data(tmp / "train.safetensors", tmp / "test.safetensors", tmp / "valid.parquet", root,
                                   CFG.vae.image_size)
    ecfg = dataclasses.replace(CFG.evaluate, num_samples=3, ks=(1, 3), vary_barcodes=1, bootstrap_reps=50)
    sampling = dataclasses.replace(CFG.sampling, steps=2)
    gen_dir, judge_dir = str(tmp / "g2pdiffusion"), str(tmp / "judge")
    ensure_ray()  # one Ray for both runs (evaluate leaves a Ray it did not start running)
    try:
        res, _ = evaluate.evaluate(gen_dir, judge_dir, data, ecfg, sampling=sampling, progress=False)
        again, _ = evaluate.evaluate(gen_dir, judge_dir, data, ecfg, sampling=sampling, progress=False)
    finally:
        ray.shutdown()
    assert {k: v for k, v in res.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert "traits" not in res and "bergmann_slope" not in res["variation"]  # no trait reader: no gold standard
    assert evaluate.eval_config_hash(ecfg, data) == evaluate.eval_config_hash(ecfg, data)
    with pytest.raises(ValueError, match="evaluate.ks"):
        evaluate.evaluate(gen_dir, judge_dir, data, dataclasses.replace(ecfg, ks=(1, 99)), progress=False)
    pipe = load_pipeline(str(tmp / "g2pdiffusion")).with_scheduler(sampling.scheduler)
    judge = Judge.from_pretrained(tmp / "judge")
    arr, tr = data.splits["seen"], data.train
    sel = evaluate.select_barcodes(arr.species, ecfg.barcodes_per_species, ecfg.max_species)
    bcs = [arr.barcode[i] for i in sel]
    bc = judge.embed_barcodes(bcs)
    names, protos = M.all_species_prototypes({s: judge.embed_barcodes(list(a.barcode)).numpy()
                                              for s, a in data.splits.items()},
                                             {s: a.species for s, a in data.splits.items()})

    def row(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        b, k = images.shape[:2]
        emb = judge.embed_images(images.reshape(b * k, *images.shape[2:])).reshape(b, k, -1)
        hits = M.species_hits(emb.reshape(b * k, -1).numpy(), np.repeat(arr.species[sel], k), names, protos)
        return (emb * bc[:, None]).sum(-1).numpy(), hits.reshape(b, k).mean(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (one CPU each)
    try:
        lat = [float(arr.lat[i]) if arr.has_place[i] else None for i in sel]
        lon = [float(arr.lon[i]) if arr.has_place[i] else None for i in sel]
        gen = generate_uint8(pipe, bcs, lat, lon, ecfg.num_samples, ecfg.seed, len(sel) * ecfg.num_samples,
                             aligner_guidance_scale=sampling.aligner_guidance_scale, num_inference_steps=2,
                             guidance_scale=sampling.guidance_scale)
    finally:
        torch.set_num_threads(threads)
    # the ground truth: the record's own image, then other records of its species in the split
    same = [[i, *[j for j in range(len(arr)) if arr.species[j] == arr.species[i] and j != i]] for i in sel]
    same = [(o * ecfg.num_samples)[:ecfg.num_samples] for o in same]
    gt, _ = row(arr.images[torch.as_tensor(same)])
    nn = M.nearest_barcodes(bcs, tr.barcode, n=ecfg.num_samples)
    for name, images in (("g2pdiffusion", gen), ("nearest_neighbour", tr.images[torch.as_tensor(nn)])):
        scores, acc = row(images)
        m = res["seen"][name]
        for k in (1, 3):
            assert m[f"score@{k}"] == pytest.approx(M.best_of_k(scores, k).mean(), abs=1e-5)
            if f"relative_score@{k}" in m:
                assert m[f"relative_score@{k}"] == pytest.approx(
                    M.best_of_k(scores, k).mean() / M.best_of_k(gt, k).mean(), abs=1e-5)
        assert m["species_accuracy"] == pytest.approx(acc.mean(), abs=1e-9)
    for k in (1, 3):
        assert res["seen"]["ground_truth"][f"score@{k}"] == pytest.approx(M.best_of_k(gt, k).mean(), abs=1e-5)
