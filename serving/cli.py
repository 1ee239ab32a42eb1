"""``g2p serve``: deploy the Ray Serve application, on a local Ray or on a running cluster.

    g2p serve [--model-dir D]                 # a local Ray with its dashboard; Ctrl-C stops it
    RAY_ADDRESS=head:6379 g2p serve [--detach]   # join a running cluster (no resources asked)
    g2p serve config [-o serve.yaml | --into deploy/rayservice.yaml]   # the Serve config, from params.yaml
    g2p serve reconfigure [--version N | --model-dir D]   # push a model to the running app's user_config

``g2p serve`` deploys the same config ``g2p serve config`` writes, through the
dashboard's REST API (as ``serve deploy`` does), so ``serve status`` and
``serve config`` report it and a promotion can update its ``user_config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file with the serve section")
    p.add_argument("--model-uri", default=None, help="registry URI (default: serve.model_uri, "
                                                     "models:/g2pdiffusion@champion)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the project's)")
    p.add_argument("--model-dir", default=None, help="serve a generator folder instead of the registry")
    p.add_argument("--judge-dir", default=None, help="with --model-dir: a judge folder for scores")
    p.add_argument("--host", default=None, help="HTTP bind address (default: serve.host)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    p.add_argument("--app-name", default="g2p", help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="the application's route prefix")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--records", default="outputs/validation/valid.parquet",
                   help="validated records whose test splits the page offers")
    p.add_argument("--data-root", default="data", help="dataset root holding the records' images")
    p.add_argument("--max-batch-size", type=int, default=None, help="override serve.max_batch_size (1 = unbatched)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--address", default=None, help="join this running Ray cluster (default: RAY_ADDRESS; "
                                                    "unset: start a local Ray with its dashboard)")
    p.add_argument("--detach", action="store_true", help="with --address: return once the app runs (it stays)")
    sub = p.add_subparsers(dest="serve_command", metavar="{config,reconfigure}")
    c = sub.add_parser("config", help="print the Serve config (serve deploy, RayService serveConfigV2)")
    _add_model_args(c)
    c.add_argument("--model-version", default=None, help="pin this registry version in user_config")
    c.add_argument("--working-dir", default=None, help="runtime_env working_dir URI (default: serve.working_dir)")
    c.add_argument("--pip", nargs="*", default=None, help="runtime_env pip pins (default: serve.pip)")
    c.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a key of the serve section, e.g. --set num_gpus=1 (repeatable)")
    c.add_argument("-o", "--out", default=None, help="write the YAML here (default: stdout)")
    c.add_argument("--into", default=None, help="rewrite the serveConfigV2 block of this RayService manifest")
    r = sub.add_parser("reconfigure", help="push a model to the running application's user_config "
                                           "(no option: pin the version its alias points at now)")
    r.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", DEFAULT_DASHBOARD),
                   help="the cluster's dashboard URL (default: RAY_DASHBOARD_ADDRESS, else %(default)s)")
    r.add_argument("--app-name", default="g2p")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--version", default=None, help="registry version to pin")
    g.add_argument("--model-dir", default=None, help="a generator folder (seen from the cluster)")
    r.add_argument("--judge-dir", default=None, help="with --model-dir")


def _section(args: argparse.Namespace):
    import yaml

    from serving.config import load_serve_section, section_dict, serve_section

    section = load_serve_section(args.params)
    if getattr(args, "set", None):
        raw = section_dict(section)
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. num_gpus=1")
            raw[key] = yaml.safe_load(value)
        section = serve_section(raw)
    changes = {k: v for k, v in (("host", args.host), ("port", args.port),
                                 ("max_batch_size", getattr(args, "max_batch_size", None)),
                                 ("working_dir", getattr(args, "working_dir", None)),
                                 ("pip", None if getattr(args, "pip", None) is None else tuple(args.pip)))
               if v is not None}
    return dataclasses.replace(section, **changes) if changes else section


def _model(args: argparse.Namespace, section, version: str | None = None):
    from serving.serve_config import ModelConfig

    if args.model_dir is not None:
        return ModelConfig(model_dir=args.model_dir, judge_dir=args.judge_dir)
    return ModelConfig(model_uri=args.model_uri or section.model_uri, version=version,
                       tracking_uri=args.tracking_uri)


def config_main(args: argparse.Namespace) -> int:
    from serving.serve_config import render_into, serve_config, to_yaml

    section = _section(args)
    text = to_yaml(serve_config(section, model=_model(args, section, args.model_version), app_name=args.app_name,
                                route_prefix=args.route_prefix))
    if args.into:
        render_into(args.into, text, "g2p serve config " + shlex.join(_config_argv(args)))
        print(f"g2p serve config: wrote serveConfigV2 of {args.into}", file=sys.stderr)
    elif args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


CONFIG_FLAGS = ("params", "set", "model_uri", "model_version", "tracking_uri", "model_dir", "judge_dir", "host", "port",
                "app_name", "route_prefix", "working_dir", "pip", "into")


def _config_argv(args: argparse.Namespace) -> list[str]:
    """The ``g2p serve config`` flags of ``args`` that differ from the defaults (what a manifest records)."""
    defaults = {"params": "params.yaml", "app_name": "g2p", "route_prefix": "/"}
    argv: list[str] = []
    for k in CONFIG_FLAGS:
        v = getattr(args, k)
        if v is None or v == defaults.get(k):
            continue
        flag = f"--{k.replace('_', '-')}"
        if k == "set":
            argv += [w for item in v for w in (flag, item)]
        else:
            argv += [flag, *(map(str, v) if isinstance(v, list) else [str(v)])]
    return argv


def reconfigure_main(args: argparse.Namespace) -> int:
    from serving.core import parse_model_uri, resolve_alias
    from serving.serve_config import MODEL_DEPLOYMENT, deployed, push_model

    if args.model_dir is not None:
        new = push_model(args.address, args.app_name, model_dir=args.model_dir, judge_dir=args.judge_dir)
    else:
        version = args.version
        if version is None:  # the version the app's alias points at now
            app = next((a for a in deployed(args.address)["applications"] if a.get("name") == args.app_name), {})
            uc = next((d.get("user_config") or {} for d in app.get("deployments", [])
                       if d.get("name") == MODEL_DEPLOYMENT), {})
            if not uc.get("model_uri") or parse_model_uri(uc["model_uri"])[1] is None:
                raise ValueError(f"reconfigure: application {args.app_name!r} serves {uc or 'nothing'}, not a "
                                 "registry alias; give --version or --model-dir")
            version = resolve_alias(*parse_model_uri(uc["model_uri"]), uc.get("tracking_uri"))
        new = push_model(args.address, args.app_name, version=version)
    print(f"g2p serve reconfigure: {args.app_name} now serves {new.dump()}")
    return 0


def _code_env() -> dict:
    """Our packages as ``py_modules`` for a driver joining a cluster (the nodes have the dependencies, not
    the checkout), and the MLflow variables set here."""
    import g2p
    import serving

    env: dict = {"py_modules": [str(Path(m.__file__).resolve().parent) for m in (g2p, serving)],
                 "excludes": ["__pycache__", "*.pyc"]}
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL") if os.environ.get(k)}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def start_ray(address: str | None, num_cpus: int | None = None) -> tuple[str, dict]:
    """Join the cluster at ``address`` (no resources: Ray refuses them there) or start a local Ray with
    its dashboard; returns (dashboard URL, the runtime env the app's config needs for our code)."""
    import ray

    if address:
        ctx = ray.init(address=address, runtime_env=_code_env(), logging_level=logging.WARNING)
        uploaded = ray.get_runtime_context().runtime_env  # the packages as gcs:// URIs the nodes can fetch
        env = {k: uploaded[k] for k in ("py_modules", "env_vars") if uploaded.get(k)}
    else:
        ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                       logging_level=logging.WARNING)
        env = {}
    if not ctx.dashboard_url:
        raise RuntimeError(f"Ray at {address or 'local'} has no dashboard; Serve's REST API needs it")
    return f"http://{ctx.dashboard_url}", env


def serve_main(args: argparse.Namespace) -> int:
    if args.serve_command == "config":
        return config_main(args)
    if args.serve_command == "reconfigure":
        return reconfigure_main(args)
    from serving.serve_config import deploy_beside, serve_config

    section = _section(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise ValueError("--detach: needs --address or RAY_ADDRESS (a local Ray ends with this process)")
    if args.model_dir is not None:
        if not Path(args.model_dir).exists():
            raise FileNotFoundError(f"--model-dir: {args.model_dir!r} not found")
        model = _model(args, section)
    else:  # pin the version the alias points at now: every replica loads the same one (fails early)
        model = _model(args, section)
        version = model.source().current_version()
        model = _model(args, section, version)
        print(f"g2p serve: {model.model_uri} is version {version}", flush=True)
    records = args.records if args.records and Path(args.records).exists() and not address else None
    dashboard, env = start_ray(address, args.num_cpus)
    config = serve_config(section, model=model, app_name=args.app_name, route_prefix=args.route_prefix,
                          records=records, data_root=args.data_root if records else None, env=env)
    deploy_beside(dashboard, config)
    import ray
    from ray import serve

    url = f"http://{section.host}:{section.port}{args.route_prefix.rstrip('/')}"
    print(f"g2p serve: {url}/ (page), {url}/docs (OpenAPI), POST {url}/v1/phenotypes", flush=True)
    print(f"g2p serve: `RAY_DASHBOARD_ADDRESS={dashboard} serve status` shows application {args.app_name!r}"
          + ("" if args.detach else "; Ctrl-C stops it"), flush=True)
    if args.detach:
        ray.shutdown()
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address:
            serve.delete(args.app_name)  # the cluster and its other applications stay
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
