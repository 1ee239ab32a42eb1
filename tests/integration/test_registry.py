"""The MLflow registry lifecycle on a real sqlite store: register, gate, force, rollback, load and predict.

A throwaway repository in tmp_path (git, data.dvc, params.yaml) holds a tiny
random-init generator, a tiny judge and hand-made ``reports/metrics.json``
files; each registration logs a real pyfunc model from code.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from g2p.config import JudgeConfig
from g2p.judge import Judge
from g2p.model import G2PDiffusion
from pipelines import registry
from pipelines.registry import PromoteSection, RegisterSection
from tests.tiny_diffusion import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
NAME = "g2pdiffusion"
CFG = tiny_config()  # 16 px, 8/16-wide UNet: sampling takes milliseconds
BARCODE = "ACGT" * 160


def write_metrics(root: Path, seen: float, unseen: float, eval_hash: str = "eval-a", half: float = 0.05) -> None:
    def row(s: float) -> dict[str, float]:
        return {"score@10": s / 2, "relative_score@10": s, "success@10": s, "success@10_low": s - half,
                "success@10_high": s + half, "species_accuracy": s, "species_accuracy_low": s - half,
                "species_accuracy_high": s + half}

    metrics = {"seen": {"num_species": 2, "num_barcodes": 4, "g2pdiffusion": row(seen), "random": row(0.01),
                        "relative_score@5": {"absent": "the ground truth is not the ceiling at k=5"}},
               "unseen": {"num_species": 1, "num_barcodes": 2, "g2pdiffusion": row(unseen)},
               "judge": {"seen": 0.9, "unseen": 0.5}, "threshold": 0.2, "eval_config_hash": eval_hash}
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))
    (root / "reports" / "per_barcode.parquet").unlink(missing_ok=True)


def write_per_barcode(root: Path, success: dict[str, list[float]]) -> None:
    """The evaluate stage's per-barcode table for the g2pdiffusion row: split -> success@10 per barcode
    (two barcodes a species), and metrics.json's success@10 their means."""
    frames = [pd.DataFrame({"split": split, "processid": [f"{split}-{i}" for i in range(len(v))],
                            "species": [f"sp{i // 2}" for i in range(len(v))], "row": "g2pdiffusion",
                            "success@10": v, "score@10": v}) for split, v in success.items()]
    pd.concat(frames).to_parquet(root / "reports" / "per_barcode.parquet", index=False)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for split, v in success.items():
        metrics[split]["g2pdiffusion"]["success@10"] = sum(v) / len(v)
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    model = G2PDiffusion(CFG)
    model.negative_bank = torch.randn(CFG.sampling.negative_bank_size, CFG.conditioner.hidden_size)
    model.save_pretrained(root / "models" / "g2pdiffusion")
    Judge(JudgeConfig(image_size=16, channels=(4, 8), embed_dim=8, dna_hidden_size=8, dna_heads=2,
                      dna_intermediate_size=16)).save_pretrained(root / "models" / "judge")
    (root / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  nfiles: 7\n  path: data\n")
    (root / "params.yaml").write_text("register:\n  model_name: g2pdiffusion\n")
    for cmd in (["init", "-q"], ["add", "data.dvc", "params.yaml"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty sqlite store, made once: creating the schema takes seconds, copying it none."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def store(repo: Path, empty_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import shutil

    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("G2P_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("G2P_USER", "tester")
    return uri


def _register(repo: Path, seen: float, unseen: float, eval_hash: str = "eval-a") -> str:
    write_metrics(repo, seen, unseen, eval_hash)
    return registry.register(RegisterSection(), PromoteSection(), root=repo, progress=False)["version"]


def _tags(uri: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_model_version(NAME, version).tags


def test_lifecycle_first_worse_better_refused_force_rollback(repo: Path, store: str, capsys) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    section = PromoteSection(rule="not_worse_ci", min_delta=0.0)  # on seen/unseen success@10, unpaired
    v1 = _register(repo, 0.50, 0.20)
    assert registry.resolve_alias(NAME, "challenger") == v1 == "1"
    t = _tags(store, v1)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert t["git.commit"] == head.strip() and t["data.md5"] == "0123abcd.dir" and t["params.sha256"]
    assert t["eval_config_hash"] == "eval-a" and t["judge"] == "bundled"
    assert t["absent.seen.relative_score_at_5"] == "the ground truth is not the ceiling at k=5"
    assert float(t["metric.seen.g2pdiffusion.success_at_10_low"]) == pytest.approx(0.45)
    run = client.get_run(t["g2p.run_id"])
    assert run.data.tags["mlflow.parentRunId"] and run.data.tags["g2p.stage"] == "register"
    assert run.data.metrics["judge.unseen"] == 0.5  # every scalar of metrics.json
    assert "evaluation/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}

    d = registry.promote(NAME, section)
    assert (d.action, registry.resolve_alias(NAME, "champion")) == ("first", v1)

    # worse beyond the champion's interval on unseen: kept, evidence recorded on the challenger
    v2 = _register(repo, 0.52, 0.10)
    dry = registry.promote(NAME, section, dry_run=True)
    assert dry.action == "kept" and "promotion.decision" not in _tags(store, v2)
    d = registry.promote(NAME, section)
    assert (d.action, d.promote) == ("kept", False)
    assert registry.resolve_alias(NAME, "champion") == v1 and registry.resolve_alias(NAME, "challenger") == v2
    t2 = _tags(store, v2)
    assert t2["promotion.decision"] == "kept" and t2["promotion.rule"] == "not_worse_ci"
    assert "FAIL" in t2["promotion.unseen.g2pdiffusion.success_at_10"]
    assert "0.1000 [0.0500, 0.1500] vs champion 0.2000 [0.1500, 0.2500]" in t2[
        "promotion.unseen.g2pdiffusion.success_at_10"]
    assert "KEPT" in client.get_model_version(NAME, v2).description

    # within the champion's intervals: promoted
    v3 = _register(repo, 0.47, 0.18)
    d = registry.promote(NAME, section)
    assert d.action == "promoted" and registry.resolve_alias(NAME, "champion") == v3
    assert _tags(store, v3)["promotion.champion_before"] == v1

    # evaluated on another set: refused however good, unless forced
    v4 = _register(repo, 0.99, 0.99, eval_hash="eval-b")
    d = registry.promote(NAME, section)
    assert d.action == "refused" and "eval_config_hash" in d.reason
    assert registry.resolve_alias(NAME, "champion") == v3

    # the CLI: --force promotes and says so; --to-version rolls back and records who and why
    from pipelines.cli import main

    assert main(["promote", "--force", "--reason", "new eval set", "--params", str(repo / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "FORCED" in out and f"champion: {v3} -> {v4}" in out
    assert registry.resolve_alias(NAME, "champion") == v4
    assert _tags(store, v4)["promotion.note"] == "new eval set"
    assert main(["promote", "--to-version", v1, "--reason", "regression in prod",
                 "--params", str(repo / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ROLLBACK" in out and f"champion: {v4} -> {v1}" in out
    assert registry.resolve_alias(NAME, "champion") == v1
    t1 = _tags(store, v1)
    assert (t1["promotion.decision"], t1["promotion.by"], t1["promotion.champion_before"]) == ("rollback", "tester", v4)
    assert main(["promote", "--to-version", "99", "--params", str(repo / "params.yaml")]) == 2
    assert "no version '99'" in capsys.readouterr().err


def test_paired_gate_pairs_the_versions_barcode_by_barcode(repo: Path, store: str) -> None:
    """The default rule: challenger - champion per barcode (the register runs' per_barcode.parquet), a
    species-clustered interval whose lower bound must reach min_delta; without the tables it refuses."""
    import numpy as np

    section = PromoteSection()
    assert (section.rule, section.min_delta) == ("paired_not_worse", -0.05)
    base = {s: np.random.default_rng(i).integers(0, 2, 60).astype(float).tolist()
            for i, s in enumerate(["seen", "unseen"])}

    def register(success: dict[str, list[float]] | None) -> str:
        write_metrics(repo, 0.5, 0.5)
        if success is not None:
            write_per_barcode(repo, success)
        return registry.register(RegisterSection(), section, root=repo, progress=False)["version"]

    v1 = register(base)
    assert registry.promote(NAME, section).action == "first"
    # the same per-barcode results: a difference of exactly 0, promoted
    v2 = register(base)
    d = registry.promote(NAME, section)
    assert d.action == "promoted" and registry.resolve_alias(NAME, "champion") == v2 != v1
    assert d.checks[0].paired["diff"] == 0.0 and d.checks[0].paired["n_clusters"] == 30
    # 12 of 60 seen barcodes lose their success (-20 points): kept, whatever the unpaired intervals say
    worse = {"seen": list(base["seen"]), "unseen": base["unseen"]}
    ones = [i for i, x in enumerate(worse["seen"]) if x == 1.0][:12]
    for i in ones:
        worse["seen"][i] = 0.0
    register(worse)
    d = registry.promote(NAME, section)
    assert (d.action, registry.resolve_alias(NAME, "champion")) == ("kept", v2)
    seen = d.checks[0]
    assert seen.paired["diff"] == pytest.approx(-0.2) and seen.paired["high"] < 0 and not seen.passed
    assert "paired difference -0.2000" in seen.text() and "minimum detectable difference" in seen.text()
    assert d.checks[1].passed  # unseen unchanged
    # a challenger without per-barcode results cannot be paired: refused, with the reason
    register(None)
    d = registry.promote(NAME, section)
    assert d.action == "refused" and "per_barcode.parquet" in d.reason


def test_stage_command_registers_gates_and_load_predicts(repo: Path, store: str, tmp_path: Path) -> None:
    """``python -m pipelines.registry register`` (the DVC stage) then the champion loads and predicts."""
    write_metrics(repo, 0.3, 0.1)
    out = tmp_path / "promotion.json"
    assert registry.main(["register", "--root", str(repo), "--params", str(repo / "params.yaml"),
                          "--out", str(out)]) == 0
    decision = json.loads(out.read_text())
    assert decision["action"] == "first" and decision["champion_after"] == decision["registered"]["version"] == "1"

    import mlflow

    model = registry.load_registered(f"models:/{NAME}@champion")
    assert model.info["model_version"] == "1" and model.info["judge"] == "bundled"
    assert model.info["data_version"] == "0123abcd.dir" and len(model.info["git_commit"]) == 40
    assert model.judge is not None and model.pipeline.cfg.vae.image_size == CFG.vae.image_size
    assert model.generator is model.pipeline  # the old attribute name still answers

    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    example = pd.DataFrame([{"barcode": BARCODE, "latitude": 45.5, "longitude": -73.6, "n": 1,
                             "steps": 2, "guidance_scale": 3.0, "aligner_guidance_scale": 1.0, "seed": 0}])
    a, b = pyfunc.predict(example), pyfunc.predict(example)
    assert list(a.columns) == ["row", "sample", "barcode", "seed", "image", "score"] and len(a) == 1
    with Image.open(io.BytesIO(a.loc[0, "image"])) as im:
        assert im.format == "PNG" and im.size == (CFG.vae.image_size, CFG.vae.image_size)
    assert isinstance(a.loc[0, "score"], float) and -1.0 <= a.loc[0, "score"] <= 1.0
    assert a.loc[0, "image"] == b.loc[0, "image"]  # same seed, same image
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names()[0] == "barcode" and info.saved_input_example_info

    with pytest.raises(ValueError, match=r"steps\[0\]: 0 is invalid"):
        model.predict(None, example.assign(steps=0))
    with pytest.raises(ValueError, match="unknown column 'lat'"):
        model.predict(None, pd.DataFrame([{"barcode": BARCODE, "lat": 1.0}]))


def test_a_model_that_does_not_load_is_not_registered(repo: Path, store: str, tmp_path: Path) -> None:
    """A folder the code cannot load (here: the aligner's weights lost) stops the stage with its reason."""
    import shutil

    from mlflow import MlflowClient

    bad = tmp_path / "bad"
    shutil.copytree(repo / "models" / "g2pdiffusion", bad)
    (bad / "aligner.safetensors").unlink()
    write_metrics(repo, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"does not load or predict with this code: .*aligner.safetensors"):
        registry.register(RegisterSection(generator_dir=str(bad)), PromoteSection(), root=repo, progress=False)
    assert MlflowClient(store).search_registered_models() == []
    with pytest.raises(ValueError, match=r"promote.metrics: 'seen.g2pdiffusion.success@1' not found"):
        registry.register(RegisterSection(), PromoteSection(metrics=("seen.g2pdiffusion.success@1",)), root=repo,
                          progress=False)


def test_a_pipeline_folder_registers_and_loads(repo: Path, store: str, tmp_path: Path) -> None:
    """A generator folder of the pipeline layout (model_index.json) registers, and loads with its info."""
    import shutil

    from g2p.pipeline import load_pipeline

    new = tmp_path / "pipeline"
    load_pipeline(str(repo / "models" / "g2pdiffusion")).save_pretrained(str(new))
    assert (new / "model_index.json").exists() and not (new / "config.json").exists()
    write_metrics(repo, 0.5, 0.5)
    out = registry.register(RegisterSection(generator_dir=str(new)), PromoteSection(), root=repo, progress=False)
    assert out["info"]["serving_sha256"] and out["info"]["g2p_sha256"]
    model = registry.load_registered(f"models:/{NAME}/{out['version']}")
    frame = model.predict(None, pd.DataFrame([{"barcode": BARCODE, "n": 2, "steps": 2, "seed": 1}]))
    assert len(frame) == 2 and list(frame["sample"]) == [0, 1]
    shutil.rmtree(new)


def test_an_experiment_registers_but_moves_no_alias(repo: Path, store: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `dvc exp run` (DVC sets DVC_EXP_NAME) the stage registers and tags a version, moves no alias
    and runs no gate; ``register.promote_experiments: true`` opts in to what `dvc repro` does."""
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "lr-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    params, out = tmp_path / "params.yaml", tmp_path / "promotion.json"
    argv = ["register", "--root", str(repo), "--params", str(params), "--out", str(out)]
    params.write_text("register:\n  model_name: g2pdiffusion\npromote:\n  rule: not_worse_point\n")
    write_metrics(repo, 0.9, 0.9)
    assert registry.main(argv) == 0
    d = json.loads(out.read_text())
    assert (d["action"], d["promote"], d["registered"]["version"]) == ("registered", False, "1")
    assert d["registered"]["dvc_experiment"] == {"name": "lr-exp", "baseline_rev": "a" * 40}
    assert "'lr-exp'" in d["reason"] and "g2p promote --to-version 1" in d["reason"]
    assert MlflowClient(store).get_registered_model(NAME).aliases == {}  # neither champion nor challenger
    assert _tags(store, "1")["dvc.exp_name"] == "lr-exp" and _tags(store, "1")["dvc.exp_baseline_rev"] == "a" * 40

    params.write_text("register:\n  model_name: g2pdiffusion\n  promote_experiments: true\n"
                      "promote:\n  rule: not_worse_point\n")
    assert registry.main(argv) == 0
    d = json.loads(out.read_text())
    assert (d["action"], d["champion_after"], d["registered"]["version"]) == ("first", "2", "2")
    assert registry.resolve_alias(NAME, "challenger") == registry.resolve_alias(NAME, "champion") == "2"
