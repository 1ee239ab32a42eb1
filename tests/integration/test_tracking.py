"""The MLflow adapter against a real sqlite store in tmp_path: a tiny stage trained in-process and
one on a local Ray worker log metrics, params, lineage tags, a sample grid and the checkpoint;
stage runs from separate processes land under one parent run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from g2p.config import preset
from g2p.model import G2PDiffusion
from g2p.train import stages
from g2p.train.loop import Hooks
from pipelines import tracking
from tests.fixtures import two_species_arrays

pytestmark = pytest.mark.integration

CFG = preset("tiny")  # 20 steps, log_every 5, checkpoint_every 10
MD5 = "0123456789abcdef0123456789abcdef.dir"
ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repo with params.yaml, data.dvc and a GX summary; MLflow points at a sqlite db beside it."""
    r = tmp_path / "repo"
    (r / "outputs" / "validation").mkdir(parents=True)
    (r / "params.yaml").write_text(yaml.safe_dump(CFG.to_dict()))
    (r / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": MD5, "size": 1, "nfiles": 3, "hash": "md5",
                                                          "path": "data"}]}))
    (r / "outputs" / "validation" / "summary.json").write_text(
        '{"records_in": 25, "valid": 24, "quarantined": 1, "passed": true}')
    _git(r, "init", "-q")
    _git(r, "add", "params.yaml", "data.dvc")
    _git(r, "commit", "-qm", "init")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    for name in (tracking.ENV_PARENT, tracking.ENV_PROJECT_RUN, tracking.ENV_DVC_ROOT, tracking.ENV_DVC_EXP,
                 tracking.ENV_DVC_BASELINE):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "store").mkdir()
    return r


def _stage_in_subprocess(repo: Path, stage: str, env: dict[str, str] | None = None) -> str:
    """A second stage as DVC runs it: its own process, no shared state but the store."""
    code = (f"from pipelines.tracking import start_stage_run\n"
            f"with start_stage_run({stage!r}, {{'x': {{'y': (1, 2)}}}}, {str(repo)!r},\n"
            f"                     log_system_metrics=False) as r:\n"
            f"    print(r.info.run_id)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return out.stdout.strip().splitlines()[-1]


def test_lineage_tags(repo: Path) -> None:
    tags = tracking.lineage_tags(repo)
    assert tags["git.commit"] == _git(repo, "rev-parse", "HEAD") and tags["git.dirty"] == "false"
    assert tags["data.md5"] == MD5 and tags["data.nfiles"] == "3"
    assert len(tags["params.sha256"]) == 64 and "params.train_vae.sha256" in tags
    assert (tags["gx.records_in"], tags["gx.valid"], tags["gx.quarantined"], tags["gx.passed"]) == \
        ("25", "24", "1", "true")
    (repo / "dvc.lock").write_text("stages: {}\n")  # what `dvc repro` writes: not a code change
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-qm", "lock")
    (repo / "dvc.lock").write_text("stages: {a: 1}\n")
    assert tracking.lineage_tags(repo)["git.dirty"] == "false"
    (repo / "params.yaml").write_text("tiny: 1\n")
    changed = tracking.lineage_tags(repo)
    assert changed["git.dirty"] == "true" and tracking.pipeline_key(changed) != tracking.pipeline_key(tags)


def test_store_is_the_projects_in_a_dvc_temp_experiment(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --temp` runs a stage in <project>/.dvc/tmp/exps/...; DVC_ROOT names the project (DVC's
    queue sets it so): the default store is the project's mlflow.db, not one in the copy."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    assert tracking.tracking_uri(copy) == f"sqlite:///{copy.resolve() / 'mlflow.db'}"  # outside DVC: the root given
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri(copy) == tracking.tracking_uri() == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # an explicit store still wins
    assert tracking.tracking_uri(copy) == "http://mlflow.internal:5000"


def test_project_run_is_the_parent_and_the_data_an_input(repo: Path) -> None:
    """`mlflow run` hands its run to the stages as MLFLOW_RUN_ID: each stage nests a run under it, in its
    experiment, rather than resuming it; each stage run has the validated data as an input, digest data.dvc's."""
    import pandas as pd
    from mlflow import MlflowClient

    pd.DataFrame({"processid": ["a", "b", "c"], "dna_barcode": ["ACGT"] * 3}).to_parquet(
        repo / "outputs" / "validation" / "valid.parquet")
    client = MlflowClient(tracking.tracking_uri())
    project = client.create_run(client.create_experiment("projects")).info  # what `mlflow run` makes
    env = {tracking.ENV_PROJECT_RUN: project.run_id, "MLFLOW_EXPERIMENT_ID": project.experiment_id,
           tracking.ENV_DVC_EXP: "lr-exp", tracking.ENV_DVC_BASELINE: "f" * 40}
    stages = [_stage_in_subprocess(repo, s, env) for s in ("train_vae", "train_base")]
    assert len(set(stages)) == 2 and project.run_id not in stages
    for rid in stages:
        run = client.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == project.run_id
        assert run.info.experiment_id == project.experiment_id and run.info.status == "FINISHED"
        assert (run.data.tags["dvc.exp_name"], run.data.tags["dvc.exp_baseline_rev"]) == ("lr-exp", "f" * 40)
        (inp,) = run.inputs.dataset_inputs
        assert (inp.dataset.name, inp.dataset.digest) == ("validated-records", MD5)
        assert json.loads(inp.dataset.source)["uri"] == str((repo / "outputs/validation/valid.parquet").resolve())
        want = {"mlflow.data.context": run.data.tags["g2p.stage"], "rows": "3", "data.md5": MD5}
        assert {t.key: t.value for t in inp.tags}.items() >= want.items()
        assert '"processid"' in inp.dataset.schema
    assert client.get_run(project.run_id).data.params == {}  # not resumed by a stage


def test_flatten_params_limits() -> None:
    p = tracking.flatten_params({"a": {"b": (8, 16), "c": None}, "long": "x" * 7000, "k" * 300: 1})
    assert p["a.b"] == "[8, 16]" and p["a.c"] == "None"
    assert len(p["long"]) <= tracking.MAX_PARAM_LEN and "sha256:" in p["long"]
    assert all(len(k) <= tracking.MAX_KEY_LEN for k in p)


def test_stage_run_in_process(repo: Path, tmp_path: Path) -> None:
    """Metrics per step, params, tags, a sample grid per eval, the checkpoint; two stages, one parent."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    data = two_species_arrays()
    with tracking.start_stage_run("train_vae", CFG, repo) as run:
        rid = run.info.run_id
        model = G2PDiffusion(CFG)
        sample = tracking.sample_grid_fn(model, data.barcode[:2], [10.0, None], [5.0, None], n=2, steps=2)
        stages.train_vae(model, data, CFG.train_vae, hooks=tracking.mlflow_hooks(rid, sample_fn=sample),
                         progress=False)
        model.save_pretrained(tmp_path / "model")
        tracking.log_checkpoint(rid, tmp_path / "model")
    second = _stage_in_subprocess(repo, "train_base")

    got = client.get_run(rid)
    assert got.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "loss")] == [5, 10, 15, 20]
    assert {"lr", "samples_per_s", "grad_norm"} <= set(got.data.metrics)
    assert got.data.params["train_vae.lr"] == "0.001" and got.data.params["vae.block_out_channels"] == "[8, 16]"
    assert got.data.tags["git.commit"] == _git(repo, "rev-parse", "HEAD") and got.data.tags["data.md5"] == MD5
    assert got.data.tags["g2p.stage"] == "train_vae" and got.data.tags["gx.quarantined"] == "1"
    images = [a.path for a in client.list_artifacts(rid, "images")]
    assert sum(p.endswith(".png") and "+step+10+" in p for p in images) == 1
    assert sum(p.endswith(".png") and "+step+20+" in p for p in images) == 1
    assert {Path(a.path).name for a in client.list_artifacts(rid, "model")} >= \
        {p.name for p in (tmp_path / "model").iterdir() if p.is_file()}
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.artifact_location.startswith((tmp_path / "store" / "mlruns").as_uri())  # local, beside the db

    # the separate stage process found the same parent; there is only one
    parent = got.data.tags["mlflow.parentRunId"]
    assert client.get_run(second).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(second).data.params["x.y"] == "[1, 2]"
    parents = client.search_runs([exp.experiment_id], "tags.`g2p.kind` = 'pipeline'")
    assert [p.info.run_id for p in parents] == [parent]

    # a restarted worker's hooks re-send logged steps: nothing is duplicated
    again = tracking.mlflow_hooks(rid, sample_fn=sample)
    again.on_step[0](20, {"loss": 9.0})
    again.on_eval[0](20)
    assert len(client.get_metric_history(rid, "loss")) == 4
    assert len(client.list_artifacts(rid, "images")) == len(images)

    # make run: an explicit parent wins; ending it closes the group
    tracking.end_pipeline(parent)
    os.environ[tracking.ENV_PARENT] = explicit = tracking.begin_pipeline(repo)
    try:
        third = _stage_in_subprocess(repo, "train_aligner")
    finally:
        del os.environ[tracking.ENV_PARENT]
    assert client.get_run(third).data.tags["mlflow.parentRunId"] == explicit


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_train import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_worker_logs_to_the_store(ray_local, repo: Path, tmp_path: Path) -> None:
    """Rank 0 inside a Ray worker logs via run id + URI; the driver adds the final checkpoint."""
    from mlflow import MlflowClient

    from pipelines.ray_train import RaySection, run_stage, save_arrays

    cfg = CFG.override({"train_vae": {"steps": 6, "log_every": 2, "checkpoint_every": 6}})
    data = save_arrays(two_species_arrays(), tmp_path / "arrays.safetensors")
    with tracking.start_stage_run("train_vae", cfg, repo, log_system_metrics=False) as run:
        rid = run.info.run_id
        result = run_stage("train_vae", cfg, data=data, run_name="vae", storage_path=tmp_path / "ray",
                           scaling=RaySection(num_workers=1), hooks_factory=tracking.ray_hooks_factory(rid))
        tracking.log_checkpoint(rid, result.model_dir)
    client = MlflowClient(tracking.tracking_uri())
    assert [m.step for m in client.get_metric_history(rid, "loss")] == [2, 4, 6]
    assert "global_samples_per_s" in client.get_run(rid).data.metrics  # added by the Ray adapter
    assert {Path(a.path).name for a in client.list_artifacts(rid, "model")} >= \
        {p.name for p in result.model_dir.iterdir() if p.is_file()}
    assert isinstance(tracking.ray_hooks_factory(rid)(1, 2), Hooks)
