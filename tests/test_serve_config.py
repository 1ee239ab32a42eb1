"""The Serve config `g2p serve config` writes (serving/serve_config.py), Ray's `serve build` of the same
application, and the model deployment's user_config / reconfigure / check_health, without a Ray cluster."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml

from g2p.config import ConfigError
from serving.config import ServeSection, serve_section
from serving.serve_config import AppArgs, ModelConfig, serve_config, validate


def test_config_carries_the_section_and_ray_accepts_it() -> None:
    from ray.serve.schema import ServeDeploySchema

    section = ServeSection(autoscaling=True, min_replicas=1, max_replicas=3, num_gpus=0.5, max_batch_size=4,
                           working_dir="https://example.org/code.zip", pip=("torch==2.13.0",), port=9001)
    cfg = serve_config(section, model=ModelConfig(model_uri="models:/g2pdiffusion@champion", version="3"))
    ServeDeploySchema.model_validate(cfg)
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 9001}
    (app,) = cfg["applications"]
    assert app["import_path"] == "serving.ray_app:app"
    assert app["runtime_env"] == {"working_dir": "https://example.org/code.zip", "pip": ["torch==2.13.0"]}
    model, ingress = app["deployments"]
    assert model["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4.0}
    assert "num_replicas" not in model and model["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert model["max_ongoing_requests"] == 16 and model["health_check_period_s"] > 0
    assert model["user_config"] == {"model_uri": "models:/g2pdiffusion@champion", "version": "3"}
    assert ingress["ray_actor_options"] == {"num_cpus": 0.0}
    # the replicas rebuild the same section from args (the runtime-env keys are the config's own)
    assert AppArgs.model_validate(app["args"]).section() == ServeSection(
        autoscaling=True, min_replicas=1, max_replicas=3, num_gpus=0.5, max_batch_size=4, port=9001)


def test_config_errors_name_the_key_and_value() -> None:
    cfg = serve_config(ServeSection())
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["deployments"][0]["num_replica"] = 2  # Ray's schema would drop it silently
    with pytest.raises(ConfigError, match=r"applications\.0\.deployments\.0\.num_replica"):
        validate(bad)
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["deployments"][0]["num_replicas"] = 0
    with pytest.raises(ConfigError, match=r"num_replicas=0"):
        validate(bad)
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["deployments"][0]["user_config"] = {"model_uri": "runs:/x", "version": "2"}
    with pytest.raises(ConfigError, match=r"runs:/x"):
        validate(bad)
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["args"]["serve"]["max_n"] = 0
    with pytest.raises(ConfigError, match=r"serve\.max_n"):
        validate(bad)
    with pytest.raises(ValueError, match="version='2'"):
        ModelConfig(model_dir="m", version="2")
    with pytest.raises(ValueError, match="exactly one"):
        ModelConfig()
    # a removed key says what replaced it, not just "unknown"
    with pytest.raises(ConfigError, match=r"serve\.reload_interval_s: 30 is no longer a setting: .*user_config"):
        serve_section({"reload_interval_s": 30})
    assert serve_section({"max_n": 9}).max_n == 9


def test_g2p_serve_config_cli(tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  num_replicas: 3\n  max_n: 5\n")
    assert main(["serve", "config", "--params", str(params), "--set", "num_gpus=1", "--model-version", "4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model = cfg["applications"][0]["deployments"][0]
    assert model["num_replicas"] == 3 and model["ray_actor_options"]["num_gpus"] == 1.0
    assert model["user_config"]["version"] == "4" and cfg["applications"][0]["args"]["serve"]["max_n"] == 5
    assert main(["serve", "config", "--params", str(params), "--set", "colour=red"]) == 2
    assert "serve.colour" in capsys.readouterr().err


def test_serve_build_of_the_application_gives_the_same_deployments(tmp_path: Path, monkeypatch) -> None:
    """Ray's own generator, `serve build serving.ray_app:application`, on the app the builder makes from
    params.yaml: its deployments carry the options `g2p serve config` writes."""
    from click.testing import CliRunner
    from ray.serve.scripts import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("serve:\n  num_replicas: 2\n  max_batch_size: 2\n")
    out = tmp_path / "built.yaml"
    res = CliRunner().invoke(cli, ["build", "serving.ray_app:application", "-o", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    built = {d["name"]: d for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    ours = {d["name"]: d for d in serve_config(ServeSection(num_replicas=2, max_batch_size=2))
            ["applications"][0]["deployments"]}
    assert set(built) == set(ours) == {"PhenotypeModel", "Ingress"}
    for name, d in ours.items():
        for key, value in d.items():
            assert built[name].get(key) == value, (name, key, built[name].get(key), value)


class FailingService:
    """A loaded model whose device went away: every batch raises."""

    model_version = "broken"

    def predict_batch(self, reqs):
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_reconfigure_loads_swaps_keeps_the_old_on_failure_and_health_follows(tmp_path: Path) -> None:
    from serving.ray_app import MAX_FAILED_BATCHES, PhenotypeModel
    from serving.testing import tiny_model

    tiny_model(tmp_path / "a", seed=0)
    tiny_model(tmp_path / "b", seed=1)
    m = PhenotypeModel.func_or_class(ServeSection(default_n=1, default_steps=1))
    with pytest.raises(RuntimeError, match="no model loaded"):
        m.check_health()
    with pytest.raises(ValueError, match="model_dir"):  # at start a bad user_config fails the replica
        asyncio.run(m.reconfigure({"model_dir": str(tmp_path / "a"), "version": "1"}))
    asyncio.run(m.reconfigure({"model_dir": str(tmp_path / "a")}))
    m.check_health()
    first = m.service
    asyncio.run(m.reconfigure({"model_dir": str(tmp_path / "a")}))  # same version: nothing reloaded
    assert m.service is first and m.reloads == 0
    asyncio.run(m.reconfigure({"model_dir": str(tmp_path / "missing")}))  # later: the old one keeps serving
    assert m.service is first and "missing" in m.reload_error
    asyncio.run(m.reconfigure({"model_dir": str(tmp_path / "b")}))
    assert m.service is not first and m.reloads == 1 and m.reload_error is None
    assert m.info()["extra"]["user_config"] == {"model_dir": str(tmp_path / "b")}
    assert m.service.model_version != first.model_version

    m.service = FailingService()
    body = {"barcode": "ACGT" * 100}


    batch = type(m).predict_batch.__wrapped__  # the method under @serve.batch (its queue needs a replica)

    async def batches() -> None:
        for _ in range(MAX_FAILED_BATCHES):
            with pytest.raises(RuntimeError, match="CUDA"):
                await batch(m, [body])

    asyncio.run(batches())
    with pytest.raises(RuntimeError, match=f"last {MAX_FAILED_BATCHES} batches failed"):
        m.check_health()
