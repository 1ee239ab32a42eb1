"""Ray Train (V2) adapter: one g2p training stage on a ``TorchTrainer``.

Thin on purpose: every worker runs the *same* stage function as the unit
tests (:mod:`g2p.train.stages`) with ``shard=Shard(rank, world_size)``; Ray
comes in through three seams only.

- ``wrap``: the stage's objective module goes through
  ``ray.train.torch.prepare_model`` (DDP, gloo on CPU, NCCL on GPU; a no-op at
  one worker), plus bf16 autocast on GPU.
- ``hooks``: ``on_step`` -> one line in the run's ``metrics.jsonl`` (rank 0),
  the user's hooks, and ``ray.train.report(metrics)`` at most every
  ``report_interval_s`` (see below); ``on_checkpoint`` -> rank 0 writes the
  model (``save_pretrained``) and the loop state (``save_tree``), safetensors
  only, and every rank reports (a checkpoint from rank 0, ``None`` elsewhere),
  then waits until Ray has registered it.
- ``resume``: ``ray.train.get_checkpoint()`` at start, so a restart after a
  worker failure (``FailureConfig.max_failures``), or a new trainer with the
  same run name and storage path, continues at the checkpoint's step.

Steps between the last checkpoint and a failure are trained again after a
restart. They are *logged* once only: at start, rank 0 reads the highest step
already in ``metrics.jsonl`` and every rank skips reporting steps up to it,
so the log, Ray's reports and any user ``on_step`` hook never see a step twice.

Why metrics-only reports are throttled: in Train V2 a report is a barrier
across workers and is only taken off a worker when the controller polls it
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default; we set 0.2 s); a
worker holds one unconsumed report, so reporting every few milliseconds
stalls training on the poll (the tiny MLM stage ran 1/75 as fast). Ray also
keeps only the metrics attached to checkpoints, so every log step goes to
``metrics.jsonl`` and the hooks (MLflow), and to Ray at most once per
``report_interval_s``; rank 0 decides and broadcasts the decision, so all
ranks call the barrier at the same steps. Every checkpoint is reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from g2p.config import ConfigError, G2PConfig, _build
from g2p.data.dataset import Arrays
from g2p.train.loop import Hooks
from pipelines import stream

STAGES = ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner")
HooksFactory = Callable[[int, int], Hooks]  # (rank, world_size) -> Hooks, called inside each worker
LOG_NAME = "metrics.jsonl"
LOG_FLUSH_S = 5.0  # how often rank 0 rewrites the step log to storage between checkpoints
# How often Train V2's controller polls workers (and so takes their reports);
# its default is 2 s. Also how soon a dead worker is noticed.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_S = "0.2"
HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train's controller polling (see ensure_ray)
START_ATTEMPTS = 3  # a local Ray start that times out (an overloaded machine) is retried
DATA_CPUS = 1  # logical CPUs a local Ray adds for Ray Data's streaming readers (see ensure_ray)


# ----------------------------------------------------------------------------
# the `ray` section of params.yaml
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RaySection:
    """How a stage is spread over Ray workers (the ``ray`` key of ``params.yaml``).

    ``bf16`` autocasts the objective on GPU only (CPU bf16 is slow);
    ``gradient_checkpointing`` trades compute for memory in the UNet, the VAE
    and the BERT conditioner. ``checkpoints_to_keep`` bounds disk (0 = all).
    ``report_interval_s``: metrics-only ``ray.train.report`` calls at most this
    often (0 = every log step; see the module docstring for why).
    ``object_store_gb`` sizes the object store of a Ray this process starts
    (None: Ray's default, 30% of memory); a cluster's is set by ``ray start
    --object-store-memory`` on each node. Ray Data streams through it, so it,
    not the data set, bounds the shared memory a stage maps.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    storage_path: str = "outputs/ray"
    bf16: bool = True
    gradient_checkpointing: bool = False
    checkpoints_to_keep: int = 0
    report_interval_s: float = 1.0
    object_store_gb: float | None = None

    def __post_init__(self) -> None:
        for key, ok in (("num_workers", self.num_workers >= 1), ("cpus_per_worker", self.cpus_per_worker >= 1),
                        ("gpus_per_worker", self.gpus_per_worker >= 0), ("max_failures", self.max_failures >= -1),
                        ("checkpoints_to_keep", self.checkpoints_to_keep >= 0),
                        ("report_interval_s", self.report_interval_s >= 0),
                        ("object_store_gb", self.object_store_gb is None or self.object_store_gb >= 0.1),
                        ("storage_path", bool(self.storage_path))):
            if not ok:
                raise ConfigError(f"ray.{key}: invalid value {getattr(self, key)!r}")


def ray_section(raw: dict[str, Any] | None) -> RaySection:
    """Strictly build the section: unknown keys and wrong types name ``ray.<key>``."""
    return _build(RaySection, raw or {}, "ray")


def load_ray_section(path: str | Path = "params.yaml") -> RaySection:
    import yaml

    p = Path(path)
    raw = (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
    return ray_section(raw.get("ray"))


# ----------------------------------------------------------------------------
# Ray start-up and the driver
# ----------------------------------------------------------------------------


def ensure_ray(num_cpus: int | None = None, object_store_gb: float | None = None) -> float:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray sized to this machine (its object store
    ``object_store_gb``, default Ray's); seconds taken.

    The dashboard is on: Train V2's placement-group cleaner polls the state API
    it serves and warns every 10 s without it. Its port is Ray's to choose
    (8265, else the next free one: Ray retries a taken port itself, where a
    port we pinned could be taken by Ray's own processes before the dashboard
    bound it, and fail the start).
    """
    import ray

    # Ray Train's controller polls its workers every 2 s by default, so a stage waits up to that for its
    # worker group to be seen started and again finished (~6 s a stage of a few steps, measured); 0.5 s
    # polling of a few workers costs nothing. Set before any trainer exists: the driver passes it on to
    # the controller, on a cluster too. A value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):
        from pipelines.ray_env import runtime_env  # our code reaches the cluster as py_modules

        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env(), logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one machine: nothing to preempt
        # One logical CPU beyond the cores: training workers reserve theirs, and
        # Ray Data's readers, which stream the shards to them, need one left.
        for attempt in range(START_ATTEMPTS):
            try:
                ray.init(num_cpus=num_cpus or (os.cpu_count() or 1) + DATA_CPUS, include_dashboard=True,
                         logging_level=logging.WARNING,
                         object_store_memory=int(object_store_gb * 2**30) if object_store_gb else None)
                break
            except Exception as e:  # Ray waits a fixed 30 s for its raylet; an overloaded machine can miss it
                if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS - 1:
                    raise
                ray.shutdown()
                print(f"ensure_ray: local Ray did not start in time ({e}); retrying", flush=True)
    return time.perf_counter() - t0


@dataclass
class StageRun:
    """What :func:`run_stage` gives back: Ray's result, the final model folder and the step log."""

    result: Any  # ray.train.Result
    model_dir: Path  # the final G2PDiffusion folder (save_pretrained layout), on the driver's disk
    log_path: str  # one JSON line per logged step / attempt start (rank 0); a path or a storage URI
    seconds: float  # wall time of trainer.fit()

    def log(self) -> list[dict[str, Any]]:
        return read_log(self.log_path)


def _model_input(init_model: str | Path | None, storage: str, run_name: str) -> str | None:
    """Where workers load the starting model from: its path, or a copy in remote storage (no shared disk)."""
    from pipelines import shards
    from pipelines import storage as st

    if not init_model:
        return None
    if not shards.remote(storage):
        return str(Path(init_model).resolve())
    dest = st.join(storage, run_name, "init_model")
    if not st.exists(st.join(dest, "config.json")):
        st.upload(init_model, dest)
    return dest


def run_stage(stage: str, cfg: G2PConfig, *, data: str | Path, run_name: str, init_model: str | Path | None = None,
              splits: Sequence[str] = ("train",), scaling: RaySection = RaySection(),
              storage_path: str | Path | None = None, hooks_factory: HooksFactory | None = None) -> StageRun:
    """Train ``stage`` on Ray workers; resumes the run ``storage_path/run_name`` if it exists.

    ``data`` is a sharded dataset folder (:mod:`pipelines.shards`: prepared
    records, or latents for the latent stages), streamed to the workers by Ray
    Data (``TorchTrainer(datasets=...)``, each worker iterating its
    ``get_dataset_shard``); or, for small runs and tests, an arrays file
    (:func:`save_arrays`) or a BIOSCAN-5M-layout root (records of
    ``splits``) that every worker loads whole. ``init_model`` is a
    ``save_pretrained`` folder to start from (the previous stage's output;
    copied to ``storage_path`` first when that is an object store); none
    builds ``G2PDiffusion(cfg)``. ``storage_path`` (default
    ``scaling.storage_path``) is a local path or a URI (``s3://bucket/prefix``,
    with ``?endpoint_override=HOST:PORT&scheme=http`` for an S3-compatible
    store): checkpoints, the step log and the model copy go there.
    ``hooks_factory(rank, world_size)`` adds hooks inside each worker (it must pickle).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines import storage as st
    from pipelines.ray_worker import worker_loop  # imports this module: imported here, not at the top

    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not one of {STAGES}")
    os.environ.setdefault(POLL_ENV, DEFAULT_POLL_S)  # read by the controller (and sent in a cluster's runtime_env)
    ensure_ray(object_store_gb=scaling.object_store_gb)
    storage = st.resolve(storage_path or scaling.storage_path)
    log_path = st.join(storage, run_name, LOG_NAME)
    view, datasets = stream.stage_input(stage, data, scaling, cfg)
    if view["manifest"] is not None and stage in stream.LATENT_STAGES and init_model:
        from g2p.model import G2PDiffusion

        # before any worker starts: a wrong VAE is a data error, not one to retry max_failures times
        stream.check_latents(G2PDiffusion.from_pretrained(init_model, cfg=cfg), view["manifest"])
    worker_cfg = {
        "stage": stage, "cfg": cfg.to_json(), **view, "splits": list(splits),
        "init_model": _model_input(init_model, storage, run_name), "ray": asdict(scaling),
        "log_path": log_path, "hooks_factory": hooks_factory,
    }
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    trainer = TorchTrainer(
        worker_loop, train_loop_config=worker_cfg, datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep or None),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()  # raises TrainingFailedError once max_failures is spent
    except Exception as e:  # Ray's errors name a worker, rarely the storage: say which run (and store) failed
        e.add_note(f"{stage}: the Ray Train run at {st.join(storage, run_name)} failed (its checkpoints and "
                   f"step log live there; the same run name resumes from the last checkpoint)")
        raise
    seconds = time.perf_counter() - t0
    ckpt = result.checkpoint  # on local storage the persisted folder itself, else a downloaded copy
    if ckpt is None:
        raise RuntimeError(f"{st.join(storage, run_name)}: the run finished without a checkpoint")
    local = type(ckpt.filesystem).__name__ == "LocalFileSystem"
    model_dir = Path(ckpt.path if local else ckpt.to_directory()) / "model"
    return StageRun(result=result, model_dir=model_dir, log_path=log_path, seconds=seconds)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The step log's rows (none if it does not exist yet); ``path`` a local path or a storage URI."""
    from pipelines import storage as st

    fs, p = st.filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
    except FileNotFoundError:
        return []
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return []
        raise st.StorageError(f"{path}: storage unreachable ({e})") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_log(path: str, rows: list[dict[str, Any]]) -> None:
    """Write the whole step log (object stores have no append); ``path`` a local path or a URI."""
    from pipelines import storage as st

    fs, p = st.filesystem(path)
    try:
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    except OSError as e:
        raise st.StorageError(f"{path}: cannot write the step log ({e})") from None


# ----------------------------------------------------------------------------
# data files (only paths travel to workers)
# ----------------------------------------------------------------------------


def save_arrays(arrays: Arrays, path: str | Path) -> Path:
    """Write :class:`Arrays` as one safetensors file (strings in its JSON metadata)."""
    from g2p.train.checkpoint import save_tree

    tree = {"processid": [str(x) for x in arrays.processid], "barcode": list(arrays.barcode),
            "species": [str(x) for x in arrays.species], "lat": arrays.lat, "lon": arrays.lon,
            "has_place": arrays.has_place, "images": arrays.images}
    save_tree(path, tree, component="arrays")
    return Path(path)


def load_data(source: str | Path, splits: Sequence[str], image_size: int | None) -> Arrays:
    """In memory: a sharded dataset folder, an arrays file, or the records of ``splits`` under a root."""
    import numpy as np

    from pipelines import shards

    src = Path(source)
    if shards.is_shards(src):
        return shards.load_arrays(src, image_size)
    if src.is_file():
        from g2p.train.checkpoint import load_tree

        t = load_tree(src)
        if image_size and t["images"] is not None and tuple(t["images"].shape[-2:]) != (image_size, image_size):
            raise ValueError(f"{src}: images are {tuple(t['images'].shape[-2:])} px, the VAE wants {image_size}")
        return Arrays(processid=np.array(t["processid"]), barcode=t["barcode"], lat=t["lat"], lon=t["lon"],
                      has_place=t["has_place"], species=np.array(t["species"], dtype=object),
                      images=t["images"] if image_size else None)
    import pandas as pd

    from g2p.data.dataset import load_arrays, records_from_frame
    from g2p.data.layout import COLUMN_DTYPES, METADATA_RELPATH

    df = pd.read_csv(src / METADATA_RELPATH, dtype=COLUMN_DTYPES)
    return load_arrays(src, records_from_frame(df[df["split"].isin(list(splits))]), image_size)


# ----------------------------------------------------------------------------
# command line (a DVC stage calls this)
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil

    from g2p.config import load_params, preset

    p = argparse.ArgumentParser(description="Train one G2PDiffusion stage on Ray Train.")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--data", required=True, help="arrays file or BIOSCAN-5M-layout root")
    p.add_argument("--splits", nargs="+", default=["train"])
    p.add_argument("--init-model", default=None, help="save_pretrained folder to start from")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", default=None)
    p.add_argument("--run-name", default=None, help="default: the stage name (same name resumes)")
    p.add_argument("--out", required=True, help="where the final model folder is copied")
    a = p.parse_args(argv)
    cfg = load_params(a.params, preset_name=a.preset) if Path(a.params).exists() else preset(a.preset or "default")
    run = run_stage(a.stage, cfg, data=a.data, splits=a.splits, init_model=a.init_model,
                    run_name=a.run_name or a.stage, scaling=load_ray_section(a.params))
    shutil.copytree(run.model_dir, a.out, dirs_exist_ok=True)
    print(json.dumps({"model": a.out, "seconds": round(run.seconds, 1), **(run.result.metrics or {})}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
