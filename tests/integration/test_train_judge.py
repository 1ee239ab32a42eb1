"""The graders' stages for real: Ray Train (two workers, DDP), a sqlite MLflow store, DVC outputs.

Tiny synthetic data (``g2p data synth --preset tiny``) and the tiny preset;
the judge and the trait reader are trained by ``pipelines.train_judge.run``
exactly as the DVC stages call it, then loaded from their folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    import pandas as pd

    from g2p.data.layout import COLUMN_DTYPES, METADATA_RELPATH
    from pipelines.ray_train import ensure_ray, load_data, save_arrays

    ws = tmp_path_factory.mktemp("graders")
    subprocess.run([str(BIN / "g2p"), "data", "synth", "--preset", "tiny", "--out", str(ws / "data"), "--quiet"],
                   check=True, capture_output=True)
    df = pd.read_csv(ws / "data" / METADATA_RELPATH, dtype=COLUMN_DTYPES)
    df.to_parquet(ws / "valid.parquet")  # every synthetic record is valid; the stage reads only a few columns
    save_arrays(load_data(ws / "data", ["train"], 32), ws / "train.safetensors")
    (ws / "params.yaml").write_text(yaml.safe_dump({
        "ray": {"num_workers": 2, "storage_path": str(ws / "ray"), "report_interval_s": 0.0},
        "train_judge": {"steps": 8, "log_every": 2, "checkpoint_every": 4},
        "train_trait_reader": {"steps": 6, "log_every": 2, "checkpoint_every": 4},
    }))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    mp.delenv("G2P_PIPELINE_RUN_ID", raising=False)
    ensure_ray(num_cpus=2)
    yield ws
    import ray

    ray.shutdown()
    mp.undo()


def _run(ws: Path, stage: str) -> dict:
    from pipelines.train_judge import run

    return run(stage, data=str(ws / "train.safetensors"), out=str(ws / "models" / stage),
               params=str(ws / "params.yaml"),
               valid=str(ws / "valid.parquet"), root=str(ws / "data"),
               ground_truth=str(ws / "data" / "bioscan5m" / "metadata" / "synthetic_ground_truth.parquet"),
               metrics_dir=str(ws / "metrics"), plots_dir=str(ws / "plots"), preset_name="tiny")


def test_train_judge_stage_trains_tracks_and_measures_retrieval(workspace: Path) -> None:
    from mlflow import MlflowClient

    from g2p.judge import Judge

    summary = _run(workspace, "train_judge")
    judge = Judge.from_pretrained(workspace / "models" / "train_judge")
    assert judge.cfg.embed_dim == 16  # the tiny preset's judge

    saved = json.loads((workspace / "metrics" / "train_judge.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["steps"] == 8
    r = saved["retrieval"]
    assert r["seen_num_species"] == 8 and r["unseen_num_species"] == 4 and r["unseen_all_num_species"] == 12
    assert r["seen_all_num_species"] == 12  # seen images decided among seen and unseen species too
    for k in ("seen_top1", "seen_top5", "unseen_top1", "unseen_all_top1", "seen_all_top1"):
        assert 0.0 <= r[k] <= 1.0
    assert r["seen_top5"] >= r["seen_top1"]
    for split in ("seen", "unseen"):
        assert -1.0 <= r[f"{split}_score_shuffled_pairs"] <= 1.0 and -1.0 <= r[f"{split}_score_true_pairs"] <= 1.0
    assert (workspace / "plots" / "train_judge.csv").read_text().startswith("step,loss\n")

    from pipelines.tracking import experiment_id

    client = MlflowClient()
    runs = client.search_runs([experiment_id()], filter_string="tags.`g2p.stage` = 'train_judge'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6, 8]
    assert client.get_run(run_id).data.metrics["retrieval_seen_top1"] == r["seen_top1"]
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/judge.safetensors",
                                                                         "model/judge_config.json"}


def test_train_trait_reader_stage_reports_every_trait(workspace: Path) -> None:
    from g2p.trait_reader import CATEGORICAL, TraitReader

    _run(workspace, "train_trait_reader")
    reader = TraitReader.from_pretrained(workspace / "models" / "train_trait_reader")
    saved = json.loads((workspace / "metrics" / "train_trait_reader.json").read_text())
    assert saved["steps"] == 6
    assert reader.cfg.prior_renders == 16  # the tiny preset's prior renders were part of its training set
    for split, n in (("val", 8), ("val_unseen", 4)):
        held = saved["held_out"][split]
        assert held["num_records"] == n and set(held["traits"]) == set(reader.TARGETS)
        for name, row in held["traits"].items():
            key = "error_rate" if name in CATEGORICAL else "mae"
            assert row[key] >= 0 and f"{key}_constant_baseline" in row
