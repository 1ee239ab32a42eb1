"""The Serve config of the phenotype application, derived from the ``serve`` section of ``params.yaml``.

    g2p serve config > serve.yaml            # what `serve deploy serve.yaml` and a RayService's serveConfigV2 take
    g2p serve config --host 0.0.0.0 --into deploy/rayservice.yaml   # rewrite the manifest's serveConfigV2

One application (``serving.ray_app:app``, its ``args`` the ``serve`` section
the replicas read) with two deployments: ``PhenotypeModel`` (replicas or
autoscaling, CPUs/GPUs per replica, ``max_ongoing_requests``, health checks,
and the ``user_config`` naming the model: :class:`ModelConfig`) and the
``Ingress``. The config is checked with Ray's own ``ServeDeploySchema``, which
silently drops keys it does not know; :func:`validate` makes those errors.

A new model version reaches live replicas through ``user_config``:
:func:`push_model` reads the applications deployed on a cluster (the
dashboard's REST API, as ``serve config`` does), changes the model
deployment's ``user_config`` and deploys the same config back (as
``serve deploy`` does). Serve then calls ``PhenotypeModel.reconfigure`` on
each running replica, in place, without restarting it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from g2p.config import ConfigError
from serving.config import ServeSection, load_serve_section, serve_section

APP_NAME = "g2p"
IMPORT_PATH = "serving.ray_app:app"
MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT = "PhenotypeModel", "Ingress"
# A replica whose check_health fails (or hangs) this long is replaced by Serve.
HEALTH = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0}
INGRESS_OPTIONS = {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.0}}


class ModelConfig(BaseModel):
    """The model deployment's ``user_config``: which model the replicas serve.

    A registry URI (``models:/g2pdiffusion@champion``), optionally pinned to
    ``version`` (what the alias pointed at when it was promoted, so every
    replica loads the same one), or a model folder (+ judge folder).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_uri: str | None = None
    version: str | None = None
    tracking_uri: str | None = None
    model_dir: str | None = None
    judge_dir: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.model_uri is None) == (self.model_dir is None):
            raise ValueError(f"give exactly one of model_uri or model_dir (got model_uri={self.model_uri!r}, "
                             f"model_dir={self.model_dir!r})")
        if self.model_uri is not None and not self.model_uri.startswith("models:/"):
            raise ValueError(f"model_uri={self.model_uri!r}: not a models:/ URI")
        if self.version is not None and self.model_uri is None:
            raise ValueError(f"version={self.version!r}: a version pins a registry model_uri, not a model_dir")
        if self.judge_dir is not None and self.model_dir is None:
            raise ValueError(f"judge_dir={self.judge_dir!r}: goes with model_dir (a registry model has its judge)")
        return self

    def source(self) -> Any:
        """The :class:`serving.core.ModelSource` to load (a pinned version becomes ``models:/<name>/<version>``)."""
        from serving.core import ModelSource, parse_model_uri

        if self.model_dir is not None:
            return ModelSource(model_dir=self.model_dir, judge_dir=self.judge_dir)
        uri = self.model_uri
        if self.version is not None:
            uri = f"models:/{parse_model_uri(uri)[0]}/{self.version}"
        return ModelSource(model_uri=uri, tracking_uri=self.tracking_uri)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class AppArgs(BaseModel):
    """Arguments of the application builder ``serving.ray_app:app`` (``serve run ... key=value``, or ``args``).

    ``serve``: the ``serve`` section itself (what ``g2p serve config`` writes,
    so the replicas need no ``params.yaml``); else it is read from ``params``
    (default ``params.yaml`` in the working directory, if there). The model
    fields give the initial ``user_config`` when the config does not set one.
    """

    model_config = ConfigDict(extra="forbid")
    serve: dict[str, Any] | None = None
    params: str | None = None
    model_uri: str | None = None
    version: str | None = None
    tracking_uri: str | None = None
    model_dir: str | None = None
    judge_dir: str | None = None
    records: str | None = None
    data_root: str | None = None

    def section(self) -> ServeSection:
        if self.serve is not None:
            return serve_section(self.serve)
        return load_serve_section(self.params or "params.yaml")

    def model(self, section: ServeSection) -> ModelConfig:
        if self.model_dir is not None:
            return ModelConfig(model_dir=self.model_dir, judge_dir=self.judge_dir)
        return ModelConfig(model_uri=self.model_uri or section.model_uri, version=self.version,
                           tracking_uri=self.tracking_uri)


# ----------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------


def model_options(section: ServeSection) -> dict[str, Any]:
    """The model deployment's options: replicas or autoscaling, CPUs/GPUs per replica, queue bound."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus},
        "max_ongoing_requests": max(16, 4 * section.max_batch_size),
    }
    if section.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": section.min_replicas, "max_replicas": section.max_replicas,
            "target_ongoing_requests": section.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = section.num_replicas
    return opts


def runtime_env(section: ServeSection) -> dict[str, Any]:
    """Code (``working_dir`` URI) and ``pip`` pins for the cluster; empty when the image has both."""
    env: dict[str, Any] = {}
    if section.working_dir:
        env["working_dir"] = section.working_dir
    if section.pip:
        env["pip"] = list(section.pip)
    return env


# Keys of the section the replicas do not read (the runtime env is the config's own).
NOT_ARGS = ("working_dir", "pip")


def section_args(section: ServeSection) -> dict[str, Any]:
    """The section as the application's ``args.serve``: what the replicas read (bounds, batching, ...)."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in NOT_ARGS}


def serve_config(section: ServeSection, *, model: ModelConfig | None = None, app_name: str = APP_NAME,
                 route_prefix: str = "/", records: str | None = None, data_root: str | None = None,
                 env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config (a ``ServeDeploySchema`` dict) of ``section``; ``model`` defaults to ``serve.model_uri``.

    ``env`` is merged into the runtime env (``g2p serve`` adds the packages it uploaded)."""
    model = model or ModelConfig(model_uri=section.model_uri)
    args: dict[str, Any] = {"serve": section_args(section)}
    args.update({k: v for k, v in (("records", records), ("data_root", data_root)) if v is not None})
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": section.host, "port": section.port},
        "applications": [{
            "name": app_name,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "runtime_env": {**runtime_env(section), **(env or {})},
            "args": args,
            "deployments": [
                {"name": MODEL_DEPLOYMENT, **model_options(section), **HEALTH, "user_config": model.dump()},
                {"name": INGRESS_DEPLOYMENT, **INGRESS_OPTIONS},
            ],
        }],
    }
    return validate(config)


def _dropped(given: Any, kept: Any, path: str) -> list[str]:
    """Keys of ``given`` that pydantic left out of ``kept`` (Ray's schemas ignore unknown keys)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = [f"{path}{k}" for k in given if k not in kept]
        for k in given:
            if k in kept:
                out += _dropped(given[k], kept[k], f"{path}{k}.")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (g, k) in enumerate(zip(given, kept)) for p in _dropped(g, k, f"{path}{i}.")]
    return []


def _where(config: Any, loc: tuple) -> str:
    """A pydantic error location as the config's own path (without the union-member tags pydantic adds)."""
    parts, node = [], config
    for x in loc:
        if isinstance(node, dict) and x in node or isinstance(node, list) and isinstance(x, int) and x < len(node):
            parts.append(str(x))
            node = node[x]
        elif not parts or not isinstance(node, (dict, list)):
            continue
        else:
            parts.append(str(x))  # a missing key: name it
            break
    return ".".join(parts)


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked by Ray's ``ServeDeploySchema`` (no key it would drop), our apps' ``args`` and
    ``user_config`` by :class:`AppArgs` and :class:`ModelConfig`; returns ``config``. ConfigError names the key."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        kept = ServeDeploySchema.model_validate(config).model_dump(exclude_unset=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"serve config: {_where(config, err['loc'])}={err.get('input')!r}: {err['msg']}") from None
    dropped = [p for p in _dropped(config, kept, "") if not p.endswith(("args", "user_config"))]
    if dropped:
        raise ConfigError(f"serve config: unknown key {dropped[0]} (Ray's ServeDeploySchema does not have it)")
    for i, app in enumerate(config["applications"]):
        if app.get("import_path") != IMPORT_PATH:
            continue
        try:
            args = AppArgs.model_validate(app.get("args") or {})
            args.section()
            for d in app.get("deployments", []):
                if d.get("name") == MODEL_DEPLOYMENT and d.get("user_config") is not None:
                    ModelConfig.model_validate(d["user_config"])
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"serve config: applications.{i} ({app.get('name')}): {where or 'user_config'}"
                              f"={err.get('input')!r}: {err['msg']}") from None
    return config


def to_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------
# a RayService manifest's serveConfigV2, kept equal to `g2p serve config`
# ----------------------------------------------------------------------------

RENDERED_BY = "# serveConfigV2 is rendered by: "
_KEY = re.compile(r"^(?P<indent>\s*)serveConfigV2:")


def render_into(manifest: str | Path, text: str, command: str) -> None:
    """Replace the ``serveConfigV2`` block of ``manifest`` by ``text`` (a literal block), with the
    ``command`` that made it in a comment above; the rest of the file is left as it is."""
    path = Path(manifest)
    lines = path.read_text().splitlines()
    at = next((i for i, line in enumerate(lines) if _KEY.match(line)), None)
    if at is None:
        raise ValueError(f"--into {manifest}: no serveConfigV2 key in the file")
    indent = _KEY.match(lines[at]).group("indent")
    end = at + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > len(indent)):
        end += 1
    start = at - 1 if at > 0 and lines[at - 1].strip().startswith(RENDERED_BY.strip()) else at
    block = [f"{indent}{RENDERED_BY}{command}", f"{indent}serveConfigV2: |"]
    block += [f"{indent}  {line}" if line else "" for line in text.rstrip("\n").splitlines()]
    path.write_text("\n".join(lines[:start] + block + lines[end:]) + "\n")


def rendered_command(manifest: str | Path) -> list[str]:
    """The ``g2p serve config`` arguments recorded above a manifest's ``serveConfigV2``."""
    import shlex

    for line in Path(manifest).read_text().splitlines():
        if line.strip().startswith(RENDERED_BY.strip()):
            words = shlex.split(line.strip()[len(RENDERED_BY.strip()):])
            if words[:3] != ["g2p", "serve", "config"]:
                raise ValueError(f"{manifest}: {line.strip()!r} is not a `g2p serve config` command")
            return words[3:]
    raise ValueError(f"{manifest}: no '{RENDERED_BY.strip()}' line above serveConfigV2")


# ----------------------------------------------------------------------------
# a running cluster: deploy, wait, push a new model version (the dashboard's REST API)
# ----------------------------------------------------------------------------


def _client(address: str) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    return ServeSubmissionClient(address)


def deployed(address: str) -> dict[str, Any]:
    """The declarative config of every application deployed on the cluster (what ``serve config`` prints,
    with the cluster's proxy and HTTP options)."""
    details = _client(address).get_serve_details()
    apps = []
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg is None:
            raise ValueError(f"serve: application {name!r} on {address} was deployed with serve.run, not a "
                             "config; redeploy it with `serve deploy` (or `g2p serve`) to update it by config")
        apps.append(cfg)
    out: dict[str, Any] = {"applications": apps}
    if details.get("proxy_location"):
        out["proxy_location"] = details["proxy_location"]
    http = details.get("http_options") or {}
    if http:
        out["http_options"] = {k: http[k] for k in ("host", "port") if k in http}
    return out


def deploy(address: str, config: dict[str, Any], *, wait_for: list[str] | None = None,
           timeout: float = 300.0) -> dict[str, Any]:
    """PUT ``config`` (all applications) to the cluster, as ``serve deploy`` does; wait until the
    applications ``wait_for`` (default: all) are redeployed and run; returns their details."""
    validate(config)
    client = _client(address)
    before = {n: a.get("last_deployed_time_s") or 0 for n, a in
              (client.get_serve_details().get("applications") or {}).items()}
    client.deploy_applications(config)
    names = wait_for if wait_for is not None else [a["name"] for a in config["applications"]]
    return wait_running(address, names, after=before, timeout=timeout)


def deploy_beside(address: str, config: dict[str, Any], *, timeout: float = 300.0) -> dict[str, Any]:
    """Deploy ``config``'s applications beside those already on the cluster (same name: replaced); the
    rest of the config (proxy, HTTP options) is ``config``'s."""
    names = {a["name"] for a in config["applications"]}
    others = [a for a in deployed(address)["applications"] if a.get("name") not in names]
    return deploy(address, {**config, "applications": others + list(config["applications"])},
                  wait_for=sorted(names), timeout=timeout)


def wait_running(address: str, names: list[str], *, after: dict[str, float] | None = None,
                 timeout: float = 300.0) -> dict[str, Any]:
    """Poll until each application in ``names`` was deployed after ``after[name]``, is RUNNING, and every
    replica of it runs; raise naming the application on DEPLOY_FAILED or after ``timeout``."""
    client, after = _client(address), after or {}
    deadline, last = time.monotonic() + timeout, "(no answer)"
    while time.monotonic() < deadline:
        apps = client.get_serve_details().get("applications") or {}
        ready = {}
        for name in names:
            app = apps.get(name)
            if app is None or (app.get("last_deployed_time_s") or 0) <= after.get(name, -1):
                last = f"{name}: not deployed yet"
                break
            if app["status"] == "DEPLOY_FAILED":
                raise RuntimeError(f"serve: application {name!r} failed to deploy: {app.get('message')}")
            states = [r["state"] for d in app["deployments"].values() for r in d.get("replicas", [])]
            if app["status"] != "RUNNING" or any(s != "RUNNING" for s in states):
                last = f"{name}: {app['status']} {app.get('message') or ''} replicas {states}"
                break
            ready[name] = app
        else:
            return ready
        time.sleep(0.5)
    raise TimeoutError(f"serve: applications {names} on {address} not running after {timeout:.0f} s ({last})")


def push_model(address: str, app_name: str = APP_NAME, *, timeout: float = 300.0, **change: Any) -> ModelConfig:
    """Set fields of the model deployment's ``user_config`` of ``app_name`` (``version="3"``,
    ``model_dir=...``) and redeploy the cluster's config; returns the new user_config once every replica
    has reconfigured (Serve calls ``reconfigure`` in place: no replica restarts, no request is dropped)."""
    current = deployed(address)
    app = next((a for a in current["applications"] if a.get("name") == app_name), None)
    if app is None:
        names = [a.get("name") for a in current["applications"]]
        raise ValueError(f"serve: no application {app_name!r} on {address} (it has {names})")
    deps = app.setdefault("deployments", [])
    dep = next((d for d in deps if d.get("name") == MODEL_DEPLOYMENT), None)
    if dep is None:
        dep = {"name": MODEL_DEPLOYMENT}
        deps.append(dep)
    old = dict(dep.get("user_config") or {})
    if change.get("model_dir") is not None or change.get("model_uri") is not None:
        old = {}  # a new source replaces the old one's fields
    new = ModelConfig.model_validate({**old, **{k: v for k, v in change.items() if v is not None}})
    dep["user_config"] = new.dump()
    deploy(address, current, wait_for=[app_name], timeout=timeout)
    return new


def push_promotion(address: str, model_name: str, version: str, app_name: str = APP_NAME,
                   timeout: float = 300.0) -> str:
    """After ``model_name`` version ``version`` became champion: pin it in the serving application's
    ``user_config`` (if that application serves ``model_name``); returns what was done, in words."""
    from serving.core import parse_model_uri

    current = deployed(address)
    app = next((a for a in current["applications"] if a.get("name") == app_name), None)
    if app is None:
        raise ValueError(f"serve: no application {app_name!r} on {address} to notify of the promotion")
    dep = next((d for d in app.get("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), {})
    uri = (dep.get("user_config") or {}).get("model_uri")
    if uri is None or parse_model_uri(uri)[0] != model_name:
        return f"serve: application {app_name!r} serves {dep.get('user_config')}, not {model_name}: left as is"
    push_model(address, app_name, version=str(version), timeout=timeout)
    return f"serve: application {app_name!r} at {address} now serves {uri} version {version}"
