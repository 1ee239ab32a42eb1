"""A training stage with ``steps: 0`` passes its input model on unchanged and starts no Ray job.

The ``paper`` preset skips train_vae and train_base (Stable Diffusion's weights);
the embedded default skips train_base (the conditional UNet trains from scratch
with condition dropout). Real MLflow (sqlite) records the skipped stage.
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
from pipelines import stage

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_zero_steps_copies_the_input_model_without_ray(tmp_path: Path) -> None:
    cfg = preset("tiny").set("train_base.steps", 0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    G2PDiffusion(cfg).save_pretrained(tmp_path / "in")
    # the stage's own command line in a fresh process, which then says whether Ray is up in it
    argv = ["stage", "--stage", "train_base", "--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "out"),
            "--init-model", str(tmp_path / "in"), "--params", str(params),
            "--metrics-dir", str(tmp_path / "metrics"), "--plots-dir", str(tmp_path / "plots")]
    code = ("import json, runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('pipelines.stage', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "ray = sys.modules.get('ray')\n"
            "print('RAY_UP', bool(ray is not None and ray.is_initialized()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "G2P_PIPELINE_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "RAY_UP False", out.stdout[-2000:]
    summary = json.loads(lines[-2])
    assert summary["skipped"] and summary["steps"] == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "in")
    metrics = json.loads((tmp_path / "metrics" / "train_base.json").read_text())
    assert metrics["steps"] == 0 and metrics["skipped"] is True and "passed on unchanged" in metrics["reason"]
    assert (tmp_path / "plots" / "train_base.csv").read_text().splitlines() == ["step,loss"]
    from mlflow import MlflowClient

    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()])
    assert [r.data.tags.get("g2p.skipped") for r in runs if r.data.tags.get("g2p.stage") == "train_base"] == \
        [metrics["reason"]]


def test_zero_steps_needs_an_input_model(tmp_path: Path) -> None:
    cfg = preset("tiny").set("train_base.steps", 0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with pytest.raises(ValueError, match="train_base.steps: 0"):
        stage.run("train_base", data="x", out=str(tmp_path / "out"), init_model=None, params=str(params),
                  splits=["train"], grid_data=None, metrics_dir=str(tmp_path), plots_dir=str(tmp_path))
