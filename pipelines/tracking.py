"""MLflow adapter: lineage tags, one parent run per pipeline, a nested run per stage, loop hooks.

The model core knows nothing of MLflow; it enters through :class:`Hooks`
(``on_step`` -> metrics, ``on_eval`` -> a sample grid) and two functions the
stage driver calls (:func:`start_stage_run`, :func:`log_checkpoint`).

Store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<project>/mlflow.db`` (MLflow
3's default backend; the plain file store is deprecated). ``<project>`` is
``DVC_ROOT`` when DVC runs the stage: DVC sets it to the project's root, and
``dvc exp run --temp`` / ``--queue`` set it to the *original* project although
the stage runs in a copy under ``.dvc/tmp/exps/`` (dvc/repo/experiments/queue/
base.py), so an experiment logs to the project's store, not to a copy of
``mlflow.db`` that is deleted with the copy. Otherwise the checkout this module
sits in. For a sqlite store our experiment keeps its artifacts in the
``mlruns/`` folder next to the database, so runs and artifacts move together
and nothing depends on the working directory a stage happened to start in.

Grouping (one parent run per ``dvc repro``, a nested run per stage). DVC runs
every stage as its own process, so stages must *find* the parent:

1. ``G2P_PIPELINE_RUN_ID`` wins: ``make run`` calls ``python -m
   pipelines.tracking begin`` (prints a fresh parent id), exports it for
   ``dvc repro`` (DVC passes the environment to stage commands) and ends it
   with ``... end``. Exact and race-free.
2. ``MLFLOW_RUN_ID``: ``mlflow run mlproject`` creates a run and hands its id
   to the entry point in this variable; ``mlflow.start_run()`` would *resume*
   that run in every stage (all stages' params and metrics in one run), so
   the stages take it as their parent instead and nest one run each under it,
   in its experiment.
3. Otherwise (a bare ``dvc repro``, ``dvc exp run``) a stage joins the newest
   *still running* parent tagged with the same pipeline key, created in the
   last ``PARENT_MAX_AGE_H`` hours, or creates one. The key hashes the git
   commit, the data hash from ``data.dvc`` and the params.yaml hash: exactly
   what decides the pipeline's results, so ``dvc exp run -S x=y`` gets a new
   parent. ``dvc.lock`` is left out (every stage rewrites it) and so is the
   dirty flag (``dvc.lock`` makes the tree dirty after the first stage). The
   age bound keeps a forced re-run tomorrow from joining today's parent.
   DVC runs one pipeline's stages one after another, so two stages never race
   to create the parent.

Metrics go through :class:`MlflowClient` with an explicit run id, never the
global active run, so the hooks work in a Ray worker given the run id and the
URI. They are idempotent: a step at or below the last step the store holds for
a key (or the image key) is skipped, so a restarted Ray worker logs nothing
twice (``ray_train`` already skips such steps; this is the backstop).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from g2p.train.loop import Hooks

ENV_PARENT = "G2P_PIPELINE_RUN_ID"
ENV_PROJECT_RUN = "MLFLOW_RUN_ID"  # set by `mlflow run` for its entry point (mlflow/projects/utils.py)
ENV_DVC_ROOT = "DVC_ROOT"  # set by DVC for every stage: the project root, also in --temp/--queue experiments
ENV_DVC_EXP = "DVC_EXP_NAME"  # set by DVC only while `dvc exp run` runs the stages
ENV_DVC_BASELINE = "DVC_EXP_BASELINE_REV"
ENV_EXPERIMENT = "G2P_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "g2p"
PARENT_MAX_AGE_H = 24.0
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
SampleFn = Callable[[int], Any]  # step -> PIL image or uint8 tensor (N, 3, H, W) / (B, n, 3, H, W)


def repo_root() -> Path:
    """The checkout this module sits in (pipelines/ is at its root, beside dvc.yaml); from an installed
    wheel, where site-packages holds no project, the current directory (the project being run)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "dvc.yaml").exists() else Path.cwd()


def store_root(root: str | Path | None = None) -> Path:
    """Where the default sqlite store lives: ``DVC_ROOT`` (the original project, also in a temp experiment
    workspace), else ``root``, else this checkout."""
    return Path(os.environ.get(ENV_DVC_ROOT) or root or repo_root()).resolve()


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the project's sqlite store (absolute, so any cwd works)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(root) / 'mlflow.db'}"


def dvc_experiment() -> dict[str, str]:
    """``{"name", "baseline_rev"}`` while ``dvc exp run`` runs this stage (DVC's environment), else ``{}``."""
    name = os.environ.get(ENV_DVC_EXP)
    return {"name": name, "baseline_rev": os.environ.get(ENV_DVC_BASELINE, "")} if name else {}


def _client(uri: str | None = None):
    from mlflow import MlflowClient  # lazily: importing this module must stay cheap

    return MlflowClient(uri or tracking_uri())


def experiment_id(uri: str | None = None, name: str | None = None) -> str:
    """Get or create the experiment; with a sqlite store its artifacts live in ``mlruns/`` beside the db."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    name = name or os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None  # else the server decides
    location = (Path(db).parent / "mlruns" / name).resolve().as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


# ----------------------------------------------------------------------------
# lineage
# ----------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str | None:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lineage_tags(root: str | Path | None = None) -> dict[str, str]:
    """What a run was made from: git commit (+ dirty), data.dvc hash, params hashes, GX summary,
    and the DVC experiment (name, baseline commit) when ``dvc exp run`` runs the stage.

    Per-section params hashes let one compare, say, only ``train_vae`` across
    runs; the dirty flag ignores ``dvc.lock`` and ``.gitignore`` files, which
    ``dvc repro`` itself rewrites.
    """
    import yaml

    root = Path(root or repo_root())
    tags: dict[str, str] = {}
    if commit := _git(root, "rev-parse", "HEAD"):
        status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore")
        tags.update({"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(bool(status)).lower()})
    dvc_file = root / "data.dvc"
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        tags["data.md5"] = ",".join(str(o.get("md5", "")) for o in outs)
        tags["data.nfiles"] = ",".join(str(o.get("nfiles", "")) for o in outs)
    params_file = root / "params.yaml"
    if params_file.exists():
        params = yaml.safe_load(params_file.read_text()) or {}
        tags["params.sha256"] = _sha256_json(params)
        tags.update({f"params.{k}.sha256": _sha256_json(v)[:16] for k, v in params.items()})
    if exp := dvc_experiment():
        tags.update({"dvc.exp_name": exp["name"], "dvc.exp_baseline_rev": exp["baseline_rev"]})
    summary = root / "outputs" / "validation" / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        tags.update({f"gx.{k}": str(s[k]).lower() if isinstance(s[k], bool) else str(s[k])
                     for k in ("records_in", "valid", "quarantined", "passed") if k in s})
    return tags


def pipeline_key(tags: Mapping[str, str]) -> str:
    """What makes two stage processes one pipeline run (see the module docstring)."""
    parts = [tags.get(k, "") for k in ("git.commit", "data.md5", "params.sha256")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def begin_pipeline(root: str | Path | None = None, tags: Mapping[str, str] | None = None,
                   uri: str | None = None) -> str:
    """Create a parent run (status RUNNING) for one pipeline execution; its id."""
    tags = dict(tags if tags is not None else lineage_tags(root))
    key = pipeline_key(tags)
    run = _client(uri).create_run(experiment_id(uri), run_name=f"pipeline-{tags.get('git.commit', 'nogit')[:8]}",
                                  tags={**tags, "g2p.kind": "pipeline", "g2p.pipeline_key": key})
    return run.info.run_id


def find_pipeline(tags: Mapping[str, str], uri: str | None = None,
                  max_age_h: float = PARENT_MAX_AGE_H) -> str | None:
    """The newest running parent with the same pipeline key, started in the last ``max_age_h`` hours."""
    runs = _client(uri).search_runs(
        [experiment_id(uri)], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`g2p.pipeline_key` = '{pipeline_key(tags)}' and attributes.status = 'RUNNING'")
    if runs and runs[0].info.start_time >= (time.time() - max_age_h * 3600) * 1000:
        return runs[0].info.run_id
    return None


def pipeline_run_id(root: str | Path | None = None, tags: Mapping[str, str] | None = None,
                    uri: str | None = None) -> str:
    """``G2P_PIPELINE_RUN_ID``, else ``mlflow run``'s ``MLFLOW_RUN_ID``, else a matching open parent, else a new one."""
    if os.environ.get(ENV_PARENT):
        return os.environ[ENV_PARENT]
    if os.environ.get(ENV_PROJECT_RUN):
        return os.environ[ENV_PROJECT_RUN]
    tags = tags if tags is not None else lineage_tags(root)
    return find_pipeline(tags, uri) or begin_pipeline(root, tags, uri)


def end_pipeline(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    _client(uri).set_terminated(run_id, status)  # stages cannot know they are the last: make run ends it


# ----------------------------------------------------------------------------
# stage runs
# ----------------------------------------------------------------------------


def flatten_params(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Config (a ``to_dict()`` object or mapping) -> ``{"train_vae.lr": "0.001", ...}`` within MLflow's limits."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    out: dict[str, str] = {}
    for k, v in d.items():
        key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", f"{prefix}{k}")
        if isinstance(v, Mapping):
            out.update(flatten_params(v, f"{key}."))
            continue
        text = json.dumps(list(v)) if isinstance(v, (list, tuple)) else str(v)
        if len(key) > MAX_KEY_LEN:
            key = f"{key[:MAX_KEY_LEN - 17]}~{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if len(text) > MAX_PARAM_LEN:  # keep it comparable: a hash of the whole value stays in
            text = f"{text[:MAX_PARAM_LEN - 30]}...sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        out[key] = text
    return out


def log_params(run_id: str, params: Mapping[str, str], uri: str | None = None) -> None:
    from mlflow.entities import Param

    items, client = [Param(k, v) for k, v in params.items()], _client(uri)
    for i in range(0, len(items), 100):  # MAX_PARAMS_TAGS_PER_BATCH
        client.log_batch(run_id, params=items[i:i + 100])


def validated_dataset(root: str | Path | None = None, tags: Mapping[str, str] | None = None) -> Any | None:
    """The validated records (``outputs/validation/valid.parquet``) as an MLflow dataset, or None before ``validate``.

    Its digest is the ``data.dvc`` hash (the data version DVC restores with
    ``dvc checkout``), so runs on the same data share one dataset in MLflow's
    UI; metadata only (name, source path, schema and row count from the
    Parquet footer): nothing is read or copied, whatever the data's size.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    root = Path(root or repo_root())
    path = root / "outputs" / "validation" / "valid.parquet"
    if not path.exists():
        return None
    tags = tags if tags is not None else lineage_tags(root)
    md5 = tags.get("data.md5") or ""
    digest = md5 if 0 < len(md5) <= 36 else hashlib.sha256(md5.encode()).hexdigest()[:32]  # MLflow: <= 36
    with warnings.catch_warnings():  # "" and "file" resolve to the same local source class: MLflow warns
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path.resolve()))
    return MetaDataset(source, name="validated-records", digest=digest or None, schema=_parquet_schema(path))


def _parquet_schema(path: Path) -> Any:
    """The file's columns as an MLflow schema, from the Parquet footer (no rows read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.types import ColSpec, DataType, Schema

    def kind(t: Any) -> DataType:
        t = t.value_type if pa.types.is_dictionary(t) else t  # categoricals: their values' type
        if pa.types.is_boolean(t):
            return DataType.boolean
        if pa.types.is_integer(t):
            return DataType.long if t.bit_width > 32 else DataType.integer
        if pa.types.is_floating(t):
            return DataType.float if t.bit_width == 32 else DataType.double
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return DataType.binary
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return DataType.datetime
        return DataType.string

    return Schema([ColSpec(kind(f.type), f.name, required=not f.nullable) for f in pq.read_schema(path)])


def _dataset_tags(root: Path, tags: Mapping[str, str]) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(root / "outputs" / "validation" / "valid.parquet").metadata.num_rows
    return {"rows": str(rows), "dvc.file": "data.dvc", "data.md5": tags.get("data.md5", ""),
            "data.nfiles": tags.get("data.nfiles", "")}


@contextmanager
def _without_project_run_env() -> Iterator[None]:
    """Hide ``MLFLOW_RUN_ID`` from ``mlflow.start_run`` (it would resume that run); restore it afterwards."""
    saved = os.environ.pop(ENV_PROJECT_RUN, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_PROJECT_RUN] = saved


@contextmanager
def start_stage_run(stage: str, cfg: Any, root: str | Path | None = None, *,
                    log_system_metrics: bool = True) -> Iterator[Any]:
    """A nested run for ``stage`` under the pipeline's parent, in the parent's experiment; yields the
    ``mlflow.ActiveRun``.

    Params = the flattened config, tags = lineage + stage, input = the
    validated data (:func:`validated_dataset`, context ``stage``); the run
    ends FAILED if the block raises. The fluent API is used only here (system
    metrics and ``log_input`` need it); everything else takes a run id.
    """
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    tags = lineage_tags(root)
    parent = pipeline_run_id(root, tags, uri)
    exp = _client(uri).get_run(parent).info.experiment_id  # `mlflow run`'s run may sit in another experiment
    with _without_project_run_env(), mlflow.start_run(
            experiment_id=exp, run_name=stage, parent_run_id=parent, nested=True,
            tags={**tags, "g2p.kind": "stage", "g2p.stage": stage}, log_system_metrics=log_system_metrics) as run:
        log_params(run.info.run_id, flatten_params(cfg), uri)
        if (dataset := validated_dataset(root, tags)) is not None:
            mlflow.log_input(dataset, context=stage, tags=_dataset_tags(Path(root or repo_root()), tags))
        yield run


def log_checkpoint(run_id: str, folder: str | Path, artifact_path: str = "model", uri: str | None = None) -> None:
    """The stage's output folder (``save_pretrained`` layout) as the run's artifacts."""
    _client(uri).log_artifacts(run_id, str(folder), artifact_path)


# ----------------------------------------------------------------------------
# loop hooks
# ----------------------------------------------------------------------------


class _MlflowLogger:
    """State behind :func:`mlflow_hooks`: the last step the store holds per key."""

    def __init__(self, run_id: str, uri: str, sample_fn: SampleFn | None, image_every: int, image_key: str) -> None:
        self.client, self.run_id = _client(uri), run_id
        self.sample_fn, self.image_every, self.image_key = sample_fn, image_every, image_key
        self.last = {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1)
                     for k in self.client.get_run(run_id).data.metrics if not k.startswith("system/")}
        self.last_image = -1
        if sample_fn is not None:
            key = re.escape(image_key.replace("/", "~"))
            steps = [int(m.group(1)) for a in self.client.list_artifacts(run_id, "images")
                     if (m := re.search(rf"{key}\+step\+(\d+)\+", a.path))]
            self.last_image = max(steps, default=-1)

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.last.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            self.last.update({m.key: step for m in fresh})

    def on_eval(self, step: int) -> None:
        if self.sample_fn is None or step <= self.last_image or (
                self.last_image >= 0 and step - self.last_image < self.image_every):
            return
        image = self.sample_fn(step)
        if not hasattr(image, "save"):  # a uint8 tensor: one grid, a row per condition
            from g2p.images import grid

            ncols = image.shape[1] if image.dim() == 5 else None
            image = grid(image.flatten(0, 1) if image.dim() == 5 else image, ncols)
        self.client.log_image(self.run_id, image, key=self.image_key, step=step)
        self.last_image = step


def mlflow_hooks(run_id: str, *, uri: str | None = None, sample_fn: SampleFn | None = None,
                 image_every: int = 0, image_key: str = "samples") -> Hooks:
    """Loop hooks logging to ``run_id``: step metrics, and a sample grid at evals ``image_every`` steps apart."""
    logger = _MlflowLogger(run_id, uri or tracking_uri(), sample_fn, image_every, image_key)
    return Hooks(on_step=[logger.on_step], on_eval=[logger.on_eval])


def _rank_zero(run_id: str, uri: str, kw: dict[str, Any], rank: int, world: int) -> Hooks:
    return mlflow_hooks(run_id, uri=uri, **kw) if rank == 0 else Hooks()


def ray_hooks_factory(run_id: str, uri: str | None = None, **kw: Any) -> Callable[[int, int], Hooks]:
    """``run_stage(hooks_factory=...)``: MLflow hooks on rank 0 only; the URI travels in the closure.

    A ``sample_fn`` has no model to sample from inside a worker (the factory
    is called without it), so sample grids of Ray stages are logged by the
    driver from the final folder (:func:`sample_grid_fn` on the loaded model).
    """
    return partial(_rank_zero, run_id, uri or tracking_uri(), kw)


def sample_grid_fn(model: Any, barcodes: list[str], latitudes: list[float | None], longitudes: list[float | None],
                   *, n: int = 2, seed: int = 0, steps: int | None = None) -> SampleFn:
    """Fixed barcodes, places and seed -> a grid per eval, comparable across steps.

    Sampling must not disturb training: the train/eval flag of every module
    and the global RNG are restored afterwards. Guidance is off until the
    aligner's negative bank exists (it is filled by ``train_aligner``).
    """
    import torch

    from g2p.pipeline import G2PDiffusionPipeline, generate_uint8

    def sample(step: int) -> Any:
        modes = [(m, m.training) for m in model.modules()]
        try:
            with torch.random.fork_rng(devices=[]):
                w = None if len(model.negative_bank) else 0.0
                pipe = G2PDiffusionPipeline.from_model(model)  # a copy: training weights untouched
                return generate_uint8(pipe, barcodes, latitudes, longitudes, n, seed, num_inference_steps=steps,
                                      aligner_guidance_scale=w)
        finally:
            for m, training in modes:
                m.train(training)

    return sample


def main(argv: list[str] | None = None) -> int:
    """``begin`` prints a new parent run id (export it as G2P_PIPELINE_RUN_ID); ``end`` closes it."""
    import argparse

    p = argparse.ArgumentParser(description="The parent MLflow run of one pipeline execution.")
    p.add_argument("action", choices=["begin", "end", "uri"])
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    a = p.parse_args(argv)
    if a.action == "uri":
        print(tracking_uri())
    elif a.action == "begin":
        print(begin_pipeline())
    elif run_id := os.environ.get(ENV_PARENT) or find_pipeline(lineage_tags()):
        end_pipeline(run_id, a.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
