"""pipelines.ray_env: the runtime_env a driver passes when it joins a cluster (no Ray started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import g2p
import pipelines
from pipelines.ray_env import PASSTHROUGH_ENV, runtime_env


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in PASSTHROUGH_ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_py_modules_are_the_package_dirs_this_driver_imports(clean_env) -> None:
    env = runtime_env()
    assert env["py_modules"] == [str(Path(g2p.__file__).resolve().parent),
                                 str(Path(pipelines.__file__).resolve().parent)]
    assert all((Path(d) / "__init__.py").is_file() for d in env["py_modules"])
    assert {"__pycache__", "*.pyc"} <= set(env["excludes"])
    assert "working_dir" not in env  # only our packages travel, not the checkout (data, models, outputs)


def test_env_vars_pass_through_only_what_is_set(clean_env) -> None:
    assert "env_vars" not in runtime_env()
    clean_env.setenv("AWS_ACCESS_KEY_ID", "k")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    clean_env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    clean_env.setenv("AWS_SESSION_TOKEN", "")  # set but empty: left out
    clean_env.setenv("HOME_SECRET_NOT_LISTED", "x")
    assert runtime_env()["env_vars"] == {"AWS_ACCESS_KEY_ID": "k", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def test_runtime_env_is_valid_for_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env())  # Ray's own validation of the fields
