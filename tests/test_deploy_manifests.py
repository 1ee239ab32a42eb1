"""deploy/: the KubeRay manifests checked against KubeRay's own CRD schemas (ray.io/v1, ../shared/kuberay-crds),
and the RayService's serveConfigV2 kept equal to what `g2p serve config` writes from params.yaml."""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "kuberay-crds"  # KubeRay v1 CRDs, shipped (Apache-2.0, tests/data/README.md)
RAYJOB, RAYSERVICE = ROOT / "deploy" / "rayjob.yaml", ROOT / "deploy" / "rayservice.yaml"


@cache
def crd_schema(kind: str) -> dict:
    """The ``openAPIV3Schema`` of KubeRay's v1 CRD for ``kind`` (RayJob, RayService)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB files
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(obj: object, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: Kubernetes prunes them silently (and `kubectl apply
    --validate=strict` refuses them); plain JSON-schema validation lets them through."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for k, v in obj.items():
            if k not in schema["properties"]:
                out.append(f"{path}{k}")
            else:
                out += unknown_fields(v, schema["properties"][k], f"{path}{k}.")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in obj.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{path}{k}.")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}{i}.")
    return out


def check_manifest(manifest: dict) -> None:
    """Raise naming the field if ``manifest`` breaks its kind's CRD schema or has a field it does not know."""
    schema = crd_schema(manifest["kind"])
    assert manifest["apiVersion"] == "ray.io/v1", manifest["apiVersion"]
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft7Validator)
    unknown = unknown_fields(manifest, schema)
    if unknown:
        raise jsonschema.ValidationError(f"{manifest['kind']}: field(s) not in the CRD schema: {unknown}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=["rayjob", "rayservice"])
def test_manifest_validates_against_the_kuberay_crd(path: Path) -> None:
    check_manifest(load(path))


def test_the_check_catches_wrong_types_missing_and_unknown_fields() -> None:
    job = load(RAYJOB)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        check_manifest(bad)
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        check_manifest(bad)
    bad = copy.deepcopy(load(RAYSERVICE))
    bad["spec"]["serveConfigV3"] = bad["spec"].pop("serveConfigV2")
    with pytest.raises(jsonschema.ValidationError, match="spec.serveConfigV3"):
        check_manifest(bad)


def _config_text(argv: list[str]) -> str:
    """What `g2p serve config <argv>` writes (its own parser and code), as text."""
    from serving.cli import _model, _section, add_serve_args
    from serving.serve_config import serve_config, to_yaml

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["config", *argv])
    section = _section(args)
    return to_yaml(serve_config(section, model=_model(args, section, args.model_version), app_name=args.app_name,
                                route_prefix=args.route_prefix))


def test_rayservice_serve_config_is_what_g2p_serve_config_writes(tmp_path: Path, monkeypatch) -> None:
    """The manifest records its `g2p serve config` command; rerun from params.yaml it must give the very text of
    serveConfigV2 (re-render with that command after changing the serve section)."""
    from ray.serve.schema import ServeDeploySchema

    from serving.serve_config import rendered_command, render_into

    monkeypatch.chdir(ROOT)  # the recorded command reads params.yaml of the repository
    argv = rendered_command(RAYSERVICE)
    assert "--into" in argv
    argv = argv[:argv.index("--into")] + argv[argv.index("--into") + 2:]
    text = _config_text(argv)
    manifest_text = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert manifest_text == text, "deploy/rayservice.yaml drifted from `g2p serve config`: rerun the command " \
                                  "recorded above its serveConfigV2"
    cfg = yaml.safe_load(manifest_text)
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert cfg["http_options"]["host"] == "0.0.0.0" and app["import_path"] == "serving.ray_app:app"
    model = next(d for d in app["deployments"] if d["name"] == "PhenotypeModel")
    assert model["ray_actor_options"]["num_gpus"] == 1 and model["user_config"]["model_uri"].endswith("@champion")
    # the check bites: another serve section gives another text, and --into writes it back
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  max_n: 4\n")
    other = _config_text(["--params", str(params), *argv])
    assert other != text and "max_n: 4" in other
    copy_path = tmp_path / "rayservice.yaml"
    copy_path.write_text(RAYSERVICE.read_text())
    render_into(copy_path, other, "g2p serve config --params p --into x")
    assert load(copy_path)["spec"]["serveConfigV2"] == other
    assert rendered_command(copy_path) == ["--params", "p", "--into", "x"]
    check_manifest(load(copy_path))
    assert load(copy_path)["spec"]["rayClusterConfig"] == load(RAYSERVICE)["spec"]["rayClusterConfig"]


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_rayjob_runs_the_pipeline_with_pinned_code_s3_storage_and_mlflow_over_http() -> None:
    job = load(RAYJOB)["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert re.fullmatch(r"https://\S+\.zip", env["working_dir"]), env["working_dir"]
    assert job["entrypoint"] == "bash deploy/train.sh" and (ROOT / "deploy" / "train.sh").is_file()
    script = (ROOT / "deploy" / "train.sh").read_text()
    assert "dvc repro" in script and "storage_path" in script
    # every pin is the one constraints.txt resolved (torch: the installed one, it is not in constraints.txt)
    constraints = _pins((ROOT / "constraints.txt").read_text())
    constraints["torch"] = importlib.metadata.version("torch").split("+")[0]
    pins = _pins("\n".join(env["pip"]["packages"]))
    assert {"torch", "diffusers", "mlflow", "dvc", "great-expectations"} <= set(pins)
    wrong = {k: (v, constraints.get(k)) for k, v in pins.items() if constraints.get(k) != v}
    assert not wrong, f"rayjob.yaml pins differ from constraints.txt: {wrong}"
    assert env["env_vars"]["G2P_STORAGE_PATH"].startswith("s3://")
    assert re.match(r"https?://", env["env_vars"]["MLFLOW_TRACKING_URI"])
    cluster = job["rayClusterSpec"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # training runs on the GPU workers
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and group["replicas"] >= 2
    assert job["shutdownAfterJobFinishes"] is True
