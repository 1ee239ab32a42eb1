"""Real `dvc repro` of the whole training lifecycle on the tiny preset (issue 4).

A throwaway git + DVC repository gets this checkout's pipeline files
(dvc.yaml, g2p/, pipelines/), a tiny params.yaml and tiny synthetic data, then
real DVC, a one-node Ray cluster started with ``ray start`` (Ray Data in ``prepare``, Ray Train in every
training stage) and a real sqlite MLflow store run end to end. Checks: the
generator folder loads and samples, `dvc metrics show` lists every stage, each
stage has a nested MLflow run under one parent, changing a sampling knob
re-runs no training stage, `dvc exp show` lists a `dvc exp run --temp`
experiment with its changed param and the stage metrics beside the workspace's,
and a stage run by `mlflow run mlproject` nests its run under MLflow's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.raycluster import RayCluster
from tests.tiny_pipeline import REPO, TRAIN_STAGES, begin_pipeline_run, make_tiny_repo, run, stage_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()

    def synth(repo: Path, env: dict[str, str]) -> None:
        run("g2p", "data", "synth", "--preset", "tiny", "--out", "data", "--quiet", cwd=repo, env=env)

    return repo, make_tiny_repo(repo, synth)


def test_repro_trains_every_stage_and_tracks_it(pipeline_repo: tuple[Path, dict[str, str]], tmp_path: Path,
                                                real_data_repro_beside: None) -> None:
    repo, env = pipeline_repo  # real_data_repro_beside: test_real_data_pipeline's repro runs meanwhile
    env = begin_pipeline_run(repo, env)
    # the stages join one Ray started for the test (as a cluster's head) instead of each starting and stopping
    # its own (~14 s a stage); a stage's own local Ray is ensure_ray's other branch, run by the in-process tests
    cluster = RayCluster(tmp_path / "ray", num_nodes=1, cpus_per_node=3, object_store_mb=512)
    with cluster:
        run("dvc", "repro", cwd=repo, env={**env, **cluster.env()})
        check_repro(repo, env, cluster.env())


def check_repro(repo: Path, env: dict[str, str], ray_env: dict[str, str]) -> None:
    """The checks of the repro: ``ray_env`` joins the test's Ray (the experiment's stage runs there too)."""

    # the final model is a diffusers pipeline folder that loads and samples
    import torch

    from g2p import G2PDiffusionPipeline
    from pipelines.ray_train import load_data

    pipe = G2PDiffusionPipeline.from_pretrained(str(repo / "models" / "g2pdiffusion"))
    assert len(pipe.aligner.negative_bank) == 8  # sampling.negative_bank_size of the tiny preset
    images = pipe("ACGT" * 100, 45.0, -75.0, num_images_per_barcode=2, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    size = pipe.cfg.vae.image_size
    assert images.shape == (2, 3, size, size)
    gen = pipe

    # prepare wrote sharded Parquet with Ray Data: every train record once, its image decoded as the
    # in-memory loader decodes it; read back in processid order, whatever order Ray Data wrote
    train = load_data(repo / "outputs" / "prepared" / "train", ["train"], gen.cfg.vae.image_size)
    ref = load_data(repo / "data", ["train"], gen.cfg.vae.image_size)
    assert list(train.processid) == sorted(ref.processid)
    order = {p: i for i, p in enumerate(ref.processid)}
    assert (train.images == ref.images[[order[p] for p in train.processid]]).all()
    pretrain = load_data(repo / "outputs" / "prepared" / "pretrain", ["pretrain"], None)
    assert len(pretrain) > len(train) and pretrain.images is None

    # encode_latents: the trained VAE's latents of every training image, once, keyed by the VAE
    from g2p.model import G2PDiffusion
    from g2p.models.vae import vae_version
    from pipelines import shards

    m = shards.read_manifest(repo / "outputs" / "latents" / "train")
    assert m["rows"] == len(train)
    assert m["latent"]["vae_version"] == vae_version(G2PDiffusion.from_pretrained(repo / "models" / "train_vae").vae)

    # DVC metrics and plots
    shown = json.loads(run("dvc", "metrics", "show", "--json", cwd=repo, env=env))
    files = next(iter(shown.values()))["data"]
    for stage in TRAIN_STAGES:
        m = files[f"metrics/{stage}.json"]["data"]
        assert m["steps"] == 4 and m["loss"] == m["loss"], (stage, m)
        assert (repo / "metrics" / "plots" / f"{stage}.csv").read_text().startswith("step,loss\n")

    # MLflow: one nested run per stage under the parent, with step metrics, the model and (diffusion) a grid
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = stage_runs(env)
    assert set(runs) == {*TRAIN_STAGES, "evaluate", "register"}
    for stage in TRAIN_STAGES:
        r = runs[stage]
        assert r.info.status == "FINISHED" and len(client.get_metric_history(r.info.run_id, "loss")) == 4
        assert any(a.path == "model" for a in client.list_artifacts(r.info.run_id))
    for stage in ("train_diffusion", "train_aligner"):
        assert client.list_artifacts(runs[stage].info.run_id, "images"), stage

    # evaluate wrote the tables; register made the first model champion
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {"seen", "unseen"} <= set(metrics)
    assert set(metrics["seen"]) >= {"ground_truth", "random", "no_aligner", "g2pdiffusion", "nearest_neighbour"}
    champion = client.get_model_version_by_alias("g2pdiffusion", "champion")
    assert str(champion.version) == "1" and champion.tags

    # a sampling knob retrains nothing: DVC's plan (--dry: what repro would run, without running it)
    status = run("dvc", "status", cwd=repo, env=env)
    assert "changed" not in status, status
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sampling"]["steps"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run("dvc", "repro", "--dry", cwd=repo, env=env)
    for stage in ("validate", "prepare", "encode_latents", *TRAIN_STAGES):
        assert f"Running stage '{stage}'" not in out, out
    assert "Running stage 'evaluate'" in out, out

    # an experiment: the run committed (metrics/ and reports/ are Git's), one param changed in a temp copy
    # with the default store (DVC_ROOT: the project's mlflow.db); `dvc exp show` puts it beside the workspace
    run("git", "checkout", "params.yaml", cwd=repo, env=env)
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-qm", "tiny run", cwd=repo, env=env)
    exp_env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "G2P_PIPELINE_RUN_ID")} | ray_env
    lr = 0.0123  # not the tiny preset's
    run("dvc", "exp", "run", "--temp", "-n", "judge-lr", "-S", f"train_judge.lr={lr}", "train_judge", cwd=repo,
        env=exp_env)
    workspace, baseline = json.loads(run("dvc", "exp", "show", "--json", cwd=repo, env=env))
    (exp,) = [r for e in baseline["experiments"] for r in e["revs"] if r["name"] == "judge-lr"]
    ws, ex = workspace["data"], exp["data"]
    assert ex["params"]["params.yaml"]["data"]["train_judge"]["lr"] == lr != ws["params"]["params.yaml"]["data"][
        "train_judge"]["lr"]
    for stage in TRAIN_STAGES:  # every stage's metrics on both rows; only the experiment's stage changed
        assert ex["metrics"][f"metrics/{stage}.json"]["data"]["steps"] == 4, stage
        same = ex["metrics"][f"metrics/{stage}.json"]["data"]["loss"] == ws["metrics"][f"metrics/{stage}.json"][
            "data"]["loss"]
        assert same == (stage != "train_judge"), stage
    assert "reports/metrics.json" in ex["metrics"] and "outputs/validation/summary.json" in ex["metrics"]
    exp_runs = client.search_runs([runs["train_judge"].info.experiment_id], "tags.`dvc.exp_name` = 'judge-lr'")
    stage_runs_ = [r for r in exp_runs if "g2p.stage" in r.data.tags]  # the other: the experiment's pipeline run
    assert [r.data.tags["g2p.stage"] for r in stage_runs_] == ["train_judge"]
    (parent,) = [r for r in exp_runs if "g2p.stage" not in r.data.tags]
    assert parent.info.run_name.startswith("pipeline-"), (parent.info.run_name, parent.data.tags)
    assert stage_runs_[0].data.tags.get("mlflow.parentRunId") == parent.info.run_id

    # `mlflow run mlproject` (a register param changed: only register re-runs): MLflow's run is the parent
    shutil.copytree(REPO / "mlproject", repo / "mlproject")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["register"]["example_steps"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project_env = {k: v for k, v in env.items() if k != "G2P_PIPELINE_RUN_ID"}
    run("mlflow", "run", "mlproject", "--env-manager", "local", "--experiment-name", "project", "-P",
        "target=register", cwd=repo, env=project_env)
    exp_id = client.get_experiment_by_name("project").experiment_id
    (project,) = client.search_runs([exp_id], "tags.`mlflow.project.entryPoint` = 'main'")
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{project.info.run_id}'")
    assert [r.data.tags["g2p.stage"] for r in children] == ["register"] and project.data.params == {
        "target": "register"}
    assert children[0].data.tags["g2p.registered_version"] == "2"
