"""A throwaway git + DVC repository holding this checkout's pipeline on the tiny preset.

Shared by the end-to-end ``dvc repro`` tests (synthetic data in
``tests/integration/test_pipeline.py``, real BIOSCAN-5M records in
``tests/integration/test_real_data_pipeline.py``): they differ only in what
``data/`` holds. Real DVC, Ray and a sqlite MLflow store; nothing mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TRAIN_STAGES = ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner",
                "train_judge", "train_trait_reader")


def run(*cmd: str, cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; its stdout, or an assertion error with the tails of stdout and stderr."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out.stdout


def make_tiny_repo(repo: Path, write_data: Callable[[Path, dict[str, str]], None], steps: int = 4,
                   params: dict[str, dict] | None = None) -> dict[str, str]:
    """Fill ``repo`` (an empty folder) and commit it; the environment to run DVC and the stages in.

    ``repo`` gets dvc.yaml, .gitignore, g2p/ and pipelines/ from this
    checkout, a tiny-preset params.yaml with ``steps`` steps per training
    stage (and the sections of ``params`` updated on top), and ``data/``
    from ``write_data(repo, env)``, tracked with
    ``dvc add``. MLflow is a sqlite store in ``repo``; the stages import the
    copied code (``PYTHONPATH``).
    """
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PYTHONPATH": str(repo)}
    env.pop("G2P_PIPELINE_RUN_ID", None)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for name in ("g2p", "pipelines"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    values = yaml.safe_load(run("g2p", "config", "dump", "--preset", "tiny", cwd=repo, env=env))
    for stage in TRAIN_STAGES:
        values[stage].update(steps=steps, log_every=1, checkpoint_every=2, batch_size=4)
    for section, update in (params or {}).items():
        values[section].update(update)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    write_data(repo, env)
    for cmd in (("git", "init", "-q"), ("git", "config", "user.email", "t@example.org"),
                ("git", "config", "user.name", "t"), ("dvc", "init", "-q"), ("dvc", "add", "-q", "data"),
                ("git", "add", "-A"), ("git", "commit", "-qm", "tiny pipeline")):
        run(*cmd, cwd=repo, env=env)
    return env


def begin_pipeline_run(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``G2P_PIPELINE_RUN_ID``: a parent MLflow run the stages nest under."""
    parent = run(sys.executable, "-m", "pipelines.tracking", "begin", cwd=repo, env=env).strip()
    return {**env, "G2P_PIPELINE_RUN_ID": parent}


def stage_runs(env: dict[str, str]) -> dict[str, object]:
    """The parent run's nested MLflow runs, by stage (``g2p.stage`` tag)."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = env["G2P_PIPELINE_RUN_ID"]
    return {r.data.tags["g2p.stage"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}


class BackgroundRepro:
    """``dvc repro`` of a tiny repository in a subprocess, on a one-node Ray of its own, awaited later.

    The two end-to-end repros run side by side: a tiny stage spends most of its time starting processes
    (Python, Ray actors, imports), not computing, so two repros on two cores take little longer than the
    longer one alone. ``start`` begins; ``wait`` returns the stdout or fails with the tails of the output;
    ``close`` (always) kills what is left and stops the Ray.
    """

    def __init__(self, repo: Path, env: dict[str, str], ray_dir: Path) -> None:
        from tests.raycluster import RayCluster

        self.repo, self.env = repo, env
        self.cluster = RayCluster(ray_dir, num_nodes=1, cpus_per_node=3, object_store_mb=512)
        self.out, self.err = repo.parent / "repro.out", repo.parent / "repro.err"
        self.proc: subprocess.Popen | None = None

    def start(self) -> BackgroundRepro:
        self.cluster.start()
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(["dvc", "repro"], cwd=self.repo, env={**self.env, **self.cluster.env()},
                                         stdout=out, stderr=err, text=True)
        return self

    def wait(self, timeout: float) -> str:
        assert self.proc is not None, "BackgroundRepro.wait before start"
        rc = self.proc.wait(timeout)
        out = self.out.read_text()
        assert rc == 0, f"dvc repro failed ({rc}):\n{out[-4000:]}\n{self.err.read_text()[-8000:]}"
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.cluster.stop()
