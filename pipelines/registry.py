"""MLflow registry adapter: register each new model as ``challenger``, promote it to ``champion`` by a rule.

The registered model (``register.model_name``, default ``g2pdiffusion``) is an
MLflow pyfunc (:mod:`pipelines.g2p_pyfunc`, logged as a *model from code*, so
no pickle) whose artifacts are the generator folder (a ``G2PDiffusionPipeline``
folder, ``model_index.json``, or one of the training layout, ``config.json``:
the pyfunc's ``load_pipeline`` reads both), the
judge folder (optional: absent -> scores are None and the model's info says
``judge: absent``) and the evaluation's ``metrics.json``. It has a signature
and an input example (one barcode, one image, two steps).

Code: the ``g2p`` package (pure Python, ~0.3 MB) and the ``serving`` package
(the pyfunc validates its rows with ``serving.schema``'s request model, the one
the HTTP servers use; bundled whole, so a process that loads the model first
and imports ``serving.core`` later still finds it) are bundled as
``code_paths`` (``register.bundle_code``), so ``mlflow.pyfunc.load_model``
works from another checkout or with none, given the pinned
``requirements.txt`` the model carries. MLflow *prepends* the bundled copies to
``sys.path`` at load time: in a process that has already imported them (this
repo's tests, the servers) those imported are used, and ``info["g2p_sha256"]``
/ ``info["serving_sha256"]`` (hashes of the bundled sources) let one check
both are the same.

Lifecycle (aliases, not the deprecated stages):

1. ``register`` (the last DVC stage): a nested ``register`` run under the
   pipeline's parent run logs the model, every scalar of ``metrics.json`` as a
   run metric (``@`` -> ``_at_``: MLflow names allow no ``@``) and the json as
   an artifact; the new version gets the lineage tags (git commit, ``data.dvc``
   md5, params hash, GX summary), the evaluation hash and the promotion
   metrics with their intervals as tags, an ``absent.<section>`` tag with
   the reason for each section ``metrics.json`` records as not measured
   (``traits`` on real data), and the alias ``challenger``. With
   ``register.auto_promote`` it then runs the gate (2) and writes
   ``reports/promotion.json``. Under ``dvc exp run`` (DVC sets
   ``DVC_EXP_NAME``) the version is registered and tagged with the
   experiment's name and baseline commit, but no alias moves and the gate
   does not run, unless ``register.promote_experiments`` opts in: an
   experiment is a question, not a release. Its version stays reachable as
   ``models:/<name>/<version>`` (``reports/promotion.json`` names it), and
   ``g2p promote --to-version N`` promotes it by hand.
2. ``g2p promote``: compares ``challenger`` with ``champion`` on
   ``promote.metrics`` (higher is better) by ``promote.rule``; both must have
   been evaluated on the same set (``eval_config_hash``) or the gate refuses.
   The first model becomes champion. The decision, each metric's values with
   intervals, and the rule go to the challenger's tags and description.
   ``--force`` promotes regardless; ``--to-version N`` moves ``champion`` to N
   (rollback); both record who and why.

The rule itself is pure and lives in :mod:`pipelines.promotion`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from g2p.config import ConfigError, _build
from pipelines.model_package import (
    PYFUNC_FILE, bundle_g2p, bundle_serving, example_barcode, pip_requirements, preflight, signature_and_example,
)
from pipelines.eval_report import PER_BARCODE
from pipelines.promotion import (  # noqa: F401  (re-exported: the rule's API lives in promotion.py)
    PAIRED, Decision, MetricCheck, PromoteSection, _get, absent_sections, decide, flatten_metrics, metric_absence,
    metric_key, paired_differences, resolve_metric,
)

CHAMPION, CHALLENGER = "champion", "challenger"
ABSENT_TAG = "absent."  # version tag prefix: absent.<metrics.json section> = why it was not measured


# ----------------------------------------------------------------------------
# params sections
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterSection:
    """The ``register`` key of ``params.yaml``: what the ``register`` stage bundles and registers."""

    model_name: str = "g2pdiffusion"
    generator_dir: str = "models/g2pdiffusion"
    judge_dir: str = "models/judge"
    metrics_path: str = "reports/metrics.json"
    auto_promote: bool = True
    promote_experiments: bool = False  # under `dvc exp run`: move the aliases and run the gate as `dvc repro` does
    bundle_code: bool = True
    example_steps: int = 2

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.model_name):
            raise ConfigError(f"register.model_name: {self.model_name!r} must be letters, digits, '_', '.', '-'")
        for key in ("generator_dir", "metrics_path"):
            if not getattr(self, key):
                raise ConfigError(f"register.{key}: must not be empty")
        if self.example_steps < 1:
            raise ConfigError(f"register.example_steps: {self.example_steps!r} must be at least 1")


def load_sections(path: str | Path = "params.yaml") -> tuple[RegisterSection, PromoteSection]:
    """Both sections, strictly (unknown keys and wrong types name ``register.<key>`` / ``promote.<key>``)."""
    import yaml

    p = Path(path)
    raw = (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
    return _build(RegisterSection, raw.get("register") or {}, "register"), \
        _build(PromoteSection, raw.get("promote") or {}, "promote")


def default_sections() -> dict[str, Any]:
    """``{"register": {...}, "promote": {...}}`` with their defaults, as plain YAML-able values (config dump)."""
    from g2p.config import _to_plain

    return {"register": _to_plain(RegisterSection()), "promote": _to_plain(PromoteSection())}




# ----------------------------------------------------------------------------
# MLflow side
# ----------------------------------------------------------------------------


def _client(tracking_uri: str | None = None):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def resolve_alias(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version number (as a string) that ``name@alias`` points at; ValueError if none."""
    mv = _version_by_alias(_client(tracking_uri), name, alias)
    if mv is None:
        raise ValueError(f"alias: no version of model {name!r} has alias {alias!r}")
    return str(mv.version)


def load_registered(uri: str = "models:/g2pdiffusion@champion", tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model(uri).unwrap_python_model()`` with ``info["model_version"]`` filled in.

    The object has ``.pipeline`` (a ``G2PDiffusionPipeline``; ``.generator`` is the same object),
    ``.judge`` (or None), ``.info`` and
    ``.predict(context, df)``. An alias is resolved first and that version
    loaded, so the info names exactly the weights loaded even if the alias
    moves meanwhile.
    """
    import mlflow

    _client(tracking_uri)  # sets the tracking and registry URIs
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    name = m.group(1) if m else None
    version = (m.group(3) or resolve_alias(name, m.group(2), tracking_uri)) if m else None
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}" if m else uri).unwrap_python_model()
    model.info.update(model_uri=uri, **({"model_name": name, "model_version": version} if m else {}))
    return model


def _version_tags(lineage: Mapping[str, str], metrics: Mapping[str, Any], flat: Mapping[str, float],
                  promote: PromoteSection, info: Mapping[str, Any], run_id: str) -> dict[str, str]:
    tags = {k: v for k, v in lineage.items() if not k.startswith("mlflow.") and not re.match(r"params\.\w+\.sha", k)}
    tags["eval_config_hash"] = str(metrics.get("eval_config_hash", ""))
    tags["judge"] = str(info.get("judge"))
    tags["g2p.run_id"] = run_id
    tags["g2p.g2p_sha256"] = str(info.get("g2p_sha256"))
    keyed = {metric_key(k): v for k, v in flat.items()}
    absent = absent_sections(metrics)
    for path, reason in absent.items():
        tags[f"{ABSENT_TAG}{metric_key(path)}"] = reason[:4000]  # e.g. seen.relative_score@1: no "@" in tags
    for m in (resolve_metric(m, keyed) for m in promote.metrics if metric_absence(m, absent) is None):
        for suffix in ("", "_low", "_high"):
            if m + suffix in flat:
                tags[f"metric.{metric_key(m + suffix)}"] = repr(flat[m + suffix])
    if "threshold" in flat:
        tags["metric.threshold"] = repr(flat["threshold"])
    return tags


def register(section: RegisterSection, promote_section: PromoteSection, *, root: str | Path | None = None,
             progress: bool = True, alias: str | None = CHALLENGER) -> dict[str, Any]:
    """Log + register the generator/judge/metrics as a new version with alias ``alias`` (None: no alias).

    Paths in ``section`` are relative to ``root`` (default: this repository);
    the store is ``tracking.tracking_uri(root)`` (``MLFLOW_TRACKING_URI``, else
    ``<DVC_ROOT or root>/mlflow.db``). Runs as the nested ``register`` run of the
    pipeline's parent run; returns
    ``{"model_name", "version", "run_id", "model_uri", "alias", "info"}``.
    """
    import mlflow

    from pipelines import tracking

    root = Path(root or tracking.repo_root())
    gen_dir, judge_dir = root / section.generator_dir, root / section.judge_dir
    metrics_path = root / section.metrics_path
    if not ((gen_dir / "model_index.json").exists() or (gen_dir / "config.json").exists()):
        raise FileNotFoundError(f"register.generator_dir: {str(gen_dir)!r} holds no generator (neither a "
                                f"pipeline's model_index.json nor a training checkpoint's config.json)")
    if not metrics_path.exists():
        raise FileNotFoundError(f"register.metrics_path: {str(metrics_path)!r} not found (run the evaluate stage)")
    metrics = json.loads(metrics_path.read_text())
    flat = flatten_metrics(metrics)
    keyed = {metric_key(k): v for k, v in flat.items()}
    absent = absent_sections(metrics)
    for m in promote_section.metrics:  # fail before logging anything (a metric recorded absent is the gate's n/a)
        if metric_absence(m, absent) is None:
            _get(keyed, resolve_metric(m, keyed), "being registered")
    uri = tracking.tracking_uri(root)
    client = _client(uri)
    lineage = tracking.lineage_tags(root)
    has_judge = (judge_dir / "config.json").exists() or (judge_dir.is_dir() and any(judge_dir.glob("*.safetensors")))
    with tempfile.TemporaryDirectory() as tmp:
        code_paths, g2p_sha, serving_sha = None, None, None
        if section.bundle_code:
            pkg, g2p_sha = bundle_g2p(Path(tmp) / "code")
            spkg, serving_sha = bundle_serving(Path(tmp) / "code")
            code_paths = [str(pkg), str(spkg)]
        info = {
            "model_name": section.model_name, "model_version": None,
            "git_commit": lineage.get("git.commit"), "git_dirty": lineage.get("git.dirty"),
            "data_version": lineage.get("data.md5"), "params_hash": lineage.get("params.sha256"),
            "eval_config_hash": metrics.get("eval_config_hash"), "judge": "bundled" if has_judge else "absent",
            "g2p_sha256": g2p_sha, "serving_sha256": serving_sha,
            "gx": {k[3:]: v for k, v in lineage.items() if k.startswith("gx.")},
        }
        artifacts = {"generator": str(gen_dir), "metrics": str(metrics_path)}
        if has_judge:
            artifacts["judge"] = str(judge_dir)
        signature, example = signature_and_example(example_barcode(), section.example_steps)
        preflight(artifacts, info, example)  # MLflow only warns when the example fails: fail here instead
        cfg = {"register": asdict(section), "promote": asdict(promote_section)}
        with tracking.start_stage_run("register", cfg, root, log_system_metrics=False) as run:
            run_id = run.info.run_id
            from mlflow.entities import Metric

            now = int(_dt.datetime.now().timestamp() * 1000)
            items = [Metric(metric_key(k), v, now, 0) for k, v in flat.items()]
            for i in range(0, len(items), 1000):
                client.log_batch(run_id, metrics=items[i:i + 1000])
            client.log_artifact(run_id, str(metrics_path), "evaluation")
            per_barcode = metrics_path.parent / PER_BARCODE  # what the paired gate pairs with a later version
            if per_barcode.exists():
                client.log_artifact(run_id, str(per_barcode), "evaluation")
            if progress:
                print(f"register: logging {section.model_name} from {gen_dir} (judge: {info['judge']})", flush=True)
            model_info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE), artifacts=artifacts, code_paths=code_paths,
                signature=signature, input_example=example, model_config=info,
                pip_requirements=pip_requirements(), registered_model_name=section.model_name)
            version = str(model_info.registered_model_version)
            if alias:
                client.set_registered_model_alias(section.model_name, alias, version)
            for k, v in _version_tags(lineage, metrics, flat, promote_section, info, run_id).items():
                client.set_model_version_tag(section.model_name, version, k, v)
            desc = (f"Registered by the `register` stage from git {str(info['git_commit'])[:12]}"
                    f"{' (dirty)' if info['git_dirty'] == 'true' else ''}, data {info['data_version']}, "
                    f"params {str(info['params_hash'])[:12]}; judge {info['judge']}; "
                    f"eval_config_hash {str(info['eval_config_hash'])[:12]}."
                    + (f" DVC experiment {lineage['dvc.exp_name']} (baseline {lineage['dvc.exp_baseline_rev'][:12]})."
                       if "dvc.exp_name" in lineage else "")
                    + "".join(f" Not measured: {p} ({r})." for p, r in absent.items()))
            client.update_model_version(section.model_name, version, description=desc)
            mlflow.set_tag("g2p.registered_version", version)
    if progress:
        print(f"register: {section.model_name} version {version} -> alias {alias or '(none)'}", flush=True)
    return {"model_name": section.model_name, "version": version, "run_id": run_id,
            "model_uri": f"models:/{section.model_name}/{version}", "alias": alias, "info": info}


def _version_metrics(client: Any, mv: Any) -> dict[str, float]:
    """A version's metrics: those of the run that registered it (all of metrics.json), else its metric.* tags."""
    flat: dict[str, float] = {}
    if mv.run_id:
        flat.update(client.get_run(mv.run_id).data.metrics)
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric.") and k[7:] not in flat:
            try:
                flat[k[7:]] = float(v)
            except ValueError:
                continue
    return flat


def _version_per_barcode(mv: Any, tracking_uri: str | None) -> Any | None:
    """The per-barcode results the run that registered ``mv`` logged (a DataFrame), or None."""
    import mlflow.artifacts
    import pandas as pd

    if not mv.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=f"evaluation/{PER_BARCODE}",
                                                       dst_path=tmp, tracking_uri=tracking_uri)
        except Exception:  # not logged (a version registered before the paired gate, or without evaluate)
            return None
        return pd.read_parquet(path)


def _paired(chal: Any, champion: Any, section: PromoteSection, chal_flat: Mapping[str, float],
            tracking_uri: str | None) -> dict[str, dict[str, float]] | None:
    """:func:`paired_differences` of the gate's metrics between two versions, or None without their tables."""
    a, b = _version_per_barcode(chal, tracking_uri), _version_per_barcode(champion, tracking_uri)
    if a is None or b is None:
        return None
    metrics = [resolve_metric(m, chal_flat) for m in section.metrics
               if metric_absence(m, _version_absent(chal)) is None]
    return paired_differences(a, b, metrics)


def _version_absent(mv: Any) -> dict[str, str]:
    """A version's unmeasured metrics.json sections (its ``absent.<path>`` tags): path -> reason."""
    return {k[len(ABSENT_TAG):]: v for k, v in (mv.tags or {}).items() if k.startswith(ABSENT_TAG)}


def _who() -> str:
    try:
        return os.environ.get("G2P_USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _record(client: Any, d: Decision, reason_by_person: str | None = None) -> None:
    """Decision -> tags and a description paragraph on the version it is about."""
    tags = {"promotion.decision": d.action, "promotion.reason": d.reason[:4000], "promotion.at": d.at,
            "promotion.by": d.by, "promotion.champion_before": str(d.champion_before),
            "promotion.champion_after": str(d.champion_after)}
    if d.rule:
        tags.update({"promotion.rule": d.rule, "promotion.min_delta": repr(d.min_delta)})
    if reason_by_person:
        tags["promotion.note"] = reason_by_person[:4000]
    for c in d.checks:
        tags[f"promotion.{metric_key(c.metric)}"] = c.text()[:4000]
    for k, v in tags.items():
        client.set_model_version_tag(d.model_name, d.version, k, v)
    old = client.get_model_version(d.model_name, d.version).description or ""
    text = d.text() + (f"\nnote: {reason_by_person}" if reason_by_person else "")
    client.update_model_version(d.model_name, d.version, description=(old + "\n\n" if old else "") + text)


def promote(name: str = "g2pdiffusion", section: PromoteSection | None = None, *, force: bool = False,
            to_version: str | int | None = None, dry_run: bool = False, note: str | None = None,
            tracking_uri: str | None = None) -> Decision:
    """The gate: move ``champion`` to ``challenger`` if the rule says so (or ``force``); or roll back to a version."""
    section = section or PromoteSection()
    client = _client(tracking_uri)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    champion = _version_by_alias(client, name, CHAMPION)
    champ_v = str(champion.version) if champion else None
    if to_version is not None:
        from mlflow.exceptions import MlflowException

        try:
            target = client.get_model_version(name, str(to_version))
        except MlflowException:
            raise ValueError(f"--to-version: model {name!r} has no version {to_version!r}") from None
        action = "unchanged" if champ_v == str(target.version) else "rollback"
        d = Decision(action, action == "rollback",
                     f"champion moved to version {target.version} by a person (was {champ_v})" if action == "rollback"
                     else f"version {target.version} is already champion",
                     name, str(target.version), champ_v, by=_who(), at=now, dry_run=dry_run,
                     eval_config_hash={"target": (target.tags or {}).get("eval_config_hash")})
    else:
        chal = _version_by_alias(client, name, CHALLENGER)
        if chal is None:
            raise ValueError(f"alias: model {name!r} has no {CHALLENGER!r} version; register one first "
                             f"(dvc repro, or python -m pipelines.registry register)")
        chal_flat = _version_metrics(client, chal)
        paired = (_paired(chal, champion, section, chal_flat, tracking_uri)
                  if section.rule == PAIRED and champion is not None and str(champion.version) != str(chal.version)
                  else None)
        d = decide(name, str(chal.version), chal_flat, champ_v,
                   _version_metrics(client, champion) if champion else None, section, paired=paired,
                   chal_hash=(chal.tags or {}).get("eval_config_hash"),
                   champ_hash=(champion.tags or {}).get("eval_config_hash") if champion else None, force=force,
                   chal_absent=_version_absent(chal), champ_absent=_version_absent(champion) if champion else None)
        d.by, d.at, d.dry_run = _who(), now, dry_run
    if not dry_run and d.action != "unchanged":
        if d.promote:
            client.set_registered_model_alias(name, CHAMPION, d.version)
        _record(client, d, note)
    return d


# ----------------------------------------------------------------------------
# command lines: `python -m pipelines.registry register` (the DVC stage), `g2p promote`
# ----------------------------------------------------------------------------


def write_decision(d: Decision, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(d.to_dict(), indent=2) + "\n")


def cmd_promote(args: argparse.Namespace) -> int:
    """``g2p promote``: print the decision; exit 0 whether promoted or kept (a refusal is a decision too)."""
    _, section = load_sections(args.params)
    name = args.name or load_sections(args.params)[0].model_name
    d = promote(name, section,
                force=args.force, to_version=args.to_version, dry_run=args.dry_run, note=args.reason)
    print(d.text())
    if args.out:
        write_decision(d, args.out)
    from pipelines.promotion import notify_serving

    said = notify_serving(d, args.serve_address, app=args.serve_app)  # None: no server named, or no move
    if said:
        print(said)
    return 0


def add_promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="registered model (default: register.model_name of params.yaml)")
    p.add_argument("--params", default="params.yaml", help="params file with the promote section")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="promote the challenger whatever the rule says")
    g.add_argument("--to-version", default=None, help="move champion to this version (rollback)")
    p.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    p.add_argument("--reason", default=None, help="why (recorded on the version; use it with --force/--to-version)")
    p.add_argument("--out", default=None, help="also write the decision as JSON here")
    p.add_argument("--serve-address", default=None,
                   help="Ray dashboard of a running g2p Serve app: pin the new champion in its user_config "
                        "(default: G2P_SERVE_ADDRESS; neither: serving is not told)")
    p.add_argument("--serve-app", default="g2p", help="the Serve application to tell (default: g2p)")


def register_stage(reg: RegisterSection, prom: PromoteSection, root: str | Path = ".") -> dict[str, Any]:
    """The ``register`` stage: register, then (``auto_promote``) the gate; the decision ``reports/promotion.json``
    holds.

    Under ``dvc exp run`` the version moves no alias and meets no gate unless
    ``register.promote_experiments``: the decision says so and names the experiment.
    """
    from pipelines.tracking import dvc_experiment, tracking_uri

    exp = dvc_experiment()
    hold = bool(exp) and not reg.promote_experiments
    result = register(reg, prom, root=root, alias=None if hold else CHALLENGER)
    registered = {k: v for k, v in result.items() if k != "info"}
    if exp:
        registered["dvc_experiment"] = exp
    if hold:
        reason = (f"registered from DVC experiment {exp['name']!r} (baseline {exp['baseline_rev'][:12]}): "
                  f"aliases unchanged (register.promote_experiments is false); promote it by hand with "
                  f"g2p promote --to-version {result['version']}")
        print(f"register: {reason}", flush=True)
        return {"action": "registered", "promote": False, "reason": reason, "registered": registered}
    if not reg.auto_promote:
        return {"action": "registered", "promote": False, "registered": registered}
    d = promote(reg.model_name, prom, tracking_uri=tracking_uri(root))
    print(d.text())
    return {**d.to_dict(), "registered": registered}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.registry", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="the DVC register stage: register + alias challenger (+ gate)")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--out", default="reports/promotion.json", help="the gate's decision (JSON)")
    r.add_argument("--root", default=".", help="repository root the register paths are relative to")
    add_promote_args(sub.add_parser("promote", help="the promotion gate (same as g2p promote)"))
    a = p.parse_args(argv)
    try:
        if a.command == "promote":
            return cmd_promote(a)
        out = register_stage(*load_sections(a.params), root=a.root)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
