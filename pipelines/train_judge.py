"""The graders' DVC stages: ``train_judge`` and ``train_trait_reader`` on Ray Train, logged to MLflow.

    python -m pipelines.train_judge --stage train_judge --data outputs/prepared/train \\
        --valid outputs/validation/valid.parquet --root data --out models/judge
    python -m pipelines.train_judge --stage train_trait_reader --data outputs/prepared/train \\
        --valid outputs/validation/valid.parquet --root data --out models/trait_reader

The trait reader's targets are the synthetic ground truth under ``--root``
(``--ground-truth`` to point elsewhere); a root without it (real BIOSCAN-5M)
skips the stage with the reason (:func:`skip_trait_reader`). Besides the
training images it learns from ``trait_reader.prior_renders`` renders of fresh
species drawn from the benchmark's prior (params ``data``, see
:mod:`g2p.data.prior`), so it reads the traits of unseen species as well as of
the training ones.

The same machinery as the generator's stages (:mod:`pipelines.stage`), reused
rather than copied: a ``TorchTrainer`` whose workers run the core training
function (:mod:`g2p.train.judge`) with ``rank``/``world_size``, DDP through
``ray_worker._wrap_for``, ``ray_worker._RayHooks`` for the step log, reports,
checkpoints and resumption, a nested MLflow run (:func:`tracking.start_stage_run`)
and ``metrics/<stage>.json`` / ``metrics/plots/<stage>.csv``
(:func:`stage.write_dvc_outputs`). What differs is the model (a
:class:`~g2p.judge.Judge` or a :class:`~g2p.trait_reader.TraitReader`, not a
``G2PDiffusion``) and what the driver measures after training:

- judge: species-level image-to-DNA retrieval (:func:`g2p.judge.species_retrieval`:
  one averaged embedding per species), on held-out ``val`` / ``val_unseen``
  images (``test`` is read by the evaluate stage alone). Seen: ``val`` images
  against the training barcodes of the seen species; unseen: ``val_unseen``
  images against the ``key_unseen`` barcodes of the unseen species (reference
  records the judge trains on with ``judge.extra_splits``; the
  ``val_unseen`` images never are). ``seen_all`` / ``unseen_all``: against
  seen + unseen keys together, as ``evaluate`` decides species (among all of
  them, so an unseen species' image that matches a seen genus-mate is a miss
  and so is the converse);
- trait reader: its own error per trait on ``val`` (seen species, held-out
  records) and ``val_unseen`` images, next to the error of always
  predicting the training mean (mode for categoricals), so evaluation can
  say how far to trust it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2p.config import G2PConfig
from g2p.data.dataset import Arrays
from g2p.data.layout import TRUTH_RELPATH
from pipelines.ray_train import HooksFactory, RaySection, StageRun, ensure_ray

GRADER_STAGES = ("train_judge", "train_trait_reader")
DEFAULT_GROUND_TRUTH = str(Path("data") / TRUTH_RELPATH)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


def load_arrays_file(path: str | Path) -> Arrays:
    """A prepared sharded dataset (or an arrays file) with its images at whatever size they were prepared."""
    from g2p.train.checkpoint import load_tree
    from pipelines import shards

    if shards.is_shards(path):
        return shards.load_arrays(path, shards.read_manifest(path).get("image_size"))

    t = load_tree(path)
    return Arrays(processid=np.array(t["processid"]), barcode=t["barcode"], lat=t["lat"], lon=t["lon"],
                  has_place=t["has_place"], species=np.array(t["species"], dtype=object), images=t["images"])


def load_split(valid: str | Path, root: str | Path, split: str, image_size: int | None) -> Arrays:
    """The validated records of ``split`` (``valid.parquet``) with images from ``root`` at ``image_size``."""
    import pandas as pd

    from g2p.data.dataset import load_arrays, records_from_frame

    df = pd.read_parquet(valid)
    rows = df[df["split"] == split]
    if rows.empty:
        raise ValueError(f"split: no validated records of split {split!r} in {valid}")
    return load_arrays(root, records_from_frame(rows), image_size)


def judge_training_data(train: Arrays, valid: str | Path, root: str | Path,
                        extra_splits: Sequence[str]) -> tuple[Arrays, np.ndarray]:
    """The judge's training records and each one's genus: ``train`` then the validated records of
    ``extra_splits`` (``judge.extra_splits``, e.g. ``key_unseen``: the unseen species' reference images and
    barcodes) at the training images' size; the genus ('' unknown) joined from ``valid.parquet`` on
    ``processid``, for the genus batches (:func:`g2p.train.judge.genus_epoch_batches`)."""
    import pandas as pd

    from g2p.config import JUDGE_FORBIDDEN_SPLITS
    from g2p.data.dataset import concat_arrays

    bad = [s for s in extra_splits if s in JUDGE_FORBIDDEN_SPLITS]
    if bad:  # the config refuses these too; a hand-built list must not leak an evaluation split either
        raise ValueError(f"extra_splits: {bad[0]!r} is a training or evaluation split, never the judge's extra data")
    size = None if train.images is None else int(train.images.shape[-1])
    data = concat_arrays([train] + [load_split(valid, root, s, size) for s in extra_splits])
    df = pd.read_parquet(valid, columns=["processid", "genus"])
    genus = df.assign(genus=df["genus"].astype("string").fillna("")).drop_duplicates("processid")
    genus = genus.set_index(genus["processid"].astype(str))["genus"]
    pids = [str(p) for p in data.processid]
    return data, genus.reindex(pids).fillna("").to_numpy(dtype=object)


def trait_targets(processid: Sequence[str], ground_truth: str | Path) -> dict[str, np.ndarray]:
    """The trait reader's targets for these records, joined on ``processid``."""
    import pandas as pd

    from g2p.trait_reader import targets_from_ground_truth

    gt = pd.read_parquet(ground_truth).set_index("processid")
    pids = [str(p) for p in processid]
    missing = [p for p in pids if p not in gt.index]
    if missing:
        raise ValueError(f"processid: {len(missing)} records have no ground truth in {ground_truth}, "
                         f"e.g. {missing[0]!r}")
    return targets_from_ground_truth(gt.loc[pids].reset_index())


# ----------------------------------------------------------------------------
# Ray Train
# ----------------------------------------------------------------------------


@dataclass
class _Saver:
    """What ``ray_worker._RayHooks`` needs of a model: ``save_pretrained`` and a ``cfg`` with ``to_json``."""

    model: Any
    cfg: G2PConfig

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory)


def build_grader(stage: str, cfg: G2PConfig, directory: str | Path | None = None) -> torch.nn.Module:
    """The stage's model: loaded from a ``save_pretrained`` folder, else fresh from ``cfg``."""
    from g2p.judge import Judge
    from g2p.trait_reader import TraitReader

    cls, section = (Judge, cfg.judge) if stage == "train_judge" else (TraitReader, cfg.trait_reader)
    return cls.from_pretrained(directory).train() if directory else cls(section)


def _worker_loop(config: dict[str, Any]) -> None:
    """Per worker: build or resume the grader, train it with the core function, save the result."""
    import ray.train
    import ray.train.torch

    from g2p.train import judge as train
    from g2p.train.checkpoint import load_tree
    from g2p.train.loop import Hooks
    from pipelines.ray_worker import _quiet_reports, _RayHooks, _wrap_for

    stage, section = config["stage"], RaySection(**config["ray"])
    cfg = G2PConfig.from_json(config["cfg"])
    tcfg = getattr(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if section.use_gpu else torch.device("cpu")
    torch.set_num_threads(section.cpus_per_worker)
    _quiet_reports()

    torch.manual_seed(tcfg.seed)  # same initial weights on every rank
    resume, ckpt = None, ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if json.loads((Path(d) / "progress.json").read_text())["final"]:
                return
            model = build_grader(stage, cfg, Path(d) / "model").to(device)
            resume = load_tree(Path(d) / "train_state.safetensors")
    else:
        model = build_grader(stage, cfg).to(device)
    torch.manual_seed(tcfg.seed + rank)

    data = load_arrays_file(config["data"])
    genus = None
    if stage == "train_judge":  # + the reference records of unseen species, and every record's genus
        data, genus = judge_training_data(data, config["valid"], config["root"], cfg.judge.extra_splits)
    factory = config["hooks_factory"]
    user = factory(rank, world) if factory else Hooks()
    ray_hooks = _RayHooks(stage, _Saver(model, cfg), tcfg, Path(config["log_path"]), user,
                          section.report_interval_s, device)
    ray_hooks.log({"event": "start", "step": int(resume["step"]) if resume else 0, "world_size": world})
    kw = dict(rank=rank, world_size=world, hooks=ray_hooks.hooks(), resume=resume, progress=False,
              wrap=_wrap_for(stage, section, device))
    if stage == "train_judge":
        state = train.train_judge(model, data, tcfg, genus=genus, **kw)
    else:
        targets = trait_targets(data.processid, config["ground_truth"])
        # every rank renders the same prior set (deterministic in the seed); batches shard it by rank
        images, targets = train.with_prior_renders(data.images, targets, cfg.trait_reader.prior_renders,
                                                   cfg.data, tcfg.seed)
        state = train.train_trait_reader(model, images, targets, tcfg, **kw)
    ray_hooks.save(state, final=True)


def run_grader_stage(stage: str, cfg: G2PConfig, *, data: str | Path, run_name: str,
                     scaling: RaySection = RaySection(), storage_path: str | Path | None = None,
                     ground_truth: str | Path = DEFAULT_GROUND_TRUTH,
                     hooks_factory: HooksFactory | None = None, valid: str | Path = "outputs/validation/valid.parquet",
                     root: str | Path = "data") -> StageRun:
    """Train ``stage`` on Ray workers (resuming ``storage_path/run_name`` if it exists); the judge also reads
    ``judge.extra_splits`` and the genera from ``valid`` (images under ``root``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_train import DEFAULT_POLL_S, LOG_NAME, POLL_ENV

    if stage not in GRADER_STAGES:
        raise ValueError(f"stage: {stage!r} is not one of {GRADER_STAGES}")
    ensure_ray(object_store_gb=scaling.object_store_gb)
    os.environ.setdefault(POLL_ENV, DEFAULT_POLL_S)
    storage = Path(storage_path or scaling.storage_path).resolve()
    log_path = storage / run_name / LOG_NAME
    worker_cfg = {"stage": stage, "cfg": cfg.to_json(), "data": str(Path(data).resolve()), "ray": asdict(scaling),
                  "log_path": str(log_path), "hooks_factory": hooks_factory,
                  "ground_truth": str(Path(ground_truth).resolve()), "valid": str(Path(valid).resolve()),
                  "root": str(Path(root).resolve())}
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep or None),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"{storage / run_name}: the run finished without a checkpoint")
    local = type(ckpt.filesystem).__name__ == "LocalFileSystem"
    model_dir = Path(ckpt.path if local else ckpt.to_directory()) / "model"
    return StageRun(result=result, model_dir=model_dir, log_path=log_path, seconds=seconds)


def _code_digest() -> str:
    import hashlib

    import g2p.data.prior
    import g2p.data.render
    import g2p.data.traits
    import g2p.judge
    import g2p.train.judge
    import g2p.train.loop
    import g2p.trait_reader

    h = hashlib.sha256()
    for module in (g2p.judge, g2p.trait_reader, g2p.train.judge, g2p.train.loop, g2p.data.prior, g2p.data.render,
                   g2p.data.traits):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def run(stage: str, *, data: str, out: str, params: str, valid: str, root: str, ground_truth: str,
        metrics_dir: str, plots_dir: str, preset_name: str | None = None,
        storage_path: str | None = None) -> dict[str, Any]:
    """The DVC stage: train on Ray, copy the model to ``out``, measure it, write metrics/plots, log to MLflow."""
    from g2p.config import load_params, preset
    from pipelines import grader_metrics, tracking  # grader_metrics imports this module: loaded here
    from pipelines.ray_train import load_ray_section
    from pipelines.stage import _metric, run_key, write_dvc_outputs

    cfg = load_params(params, preset_name=preset_name) if Path(params).exists() else preset(preset_name or "default")
    if stage == "train_trait_reader" and not Path(ground_truth).exists():
        summary = skip_trait_reader(out, ground_truth, Path(metrics_dir) / f"{stage}.json",
                                    Path(plots_dir) / f"{stage}.csv")
        with tracking.start_stage_run(stage, cfg, log_system_metrics=False) as active:  # the run says why too
            tracking._client(tracking.tracking_uri()).set_tag(active.info.run_id, "g2p.skipped", summary["reason"])
        return summary
    scaling = load_ray_section(params)
    model_section = "judge" if stage == "train_judge" else "trait_reader"
    # the run name also keys on the training code: a changed model or loop must not "resume" (i.e. reuse)
    # a finished run of the old code under the same params
    key = {s: getattr(cfg, s) for s in (model_section, stage)}
    if stage == "train_trait_reader":
        key["data"] = cfg.data  # the prior renders are drawn from the benchmark's data config
    key["code"] = _code_digest()
    key_json = json.dumps(key, default=str, sort_keys=True)
    extra_input = ground_truth if stage == "train_trait_reader" else valid  # the judge's extra splits, genera
    name = f"{stage}-{run_key(stage, key_json, data, extra_input, asdict(scaling))}"
    uri = tracking.tracking_uri()
    with tracking.start_stage_run(stage, cfg) as active:
        run_id = active.info.run_id
        result = run_grader_stage(stage, cfg, data=data, run_name=name, scaling=scaling, storage_path=storage_path,
                                  ground_truth=ground_truth, hooks_factory=tracking.ray_hooks_factory(run_id, uri),
                                  valid=valid, root=root)
        dest = Path(out)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(result.model_dir, dest)
        tracking.log_checkpoint(run_id, dest, uri=uri)
        metrics_path = Path(metrics_dir) / f"{stage}.json"
        summary = write_dvc_outputs(stage, result.log(), result.seconds, metrics_path,
                                    Path(plots_dir) / f"{stage}.csv")
        summary["ray_run"] = name
        model = build_grader(stage, cfg, dest).eval()
        if stage == "train_judge":
            measured = grader_metrics.judge_metrics(model, valid, root)
            summary["retrieval"] = measured
            flat = {f"retrieval_{k}": v for k, v in measured.items()}
        else:
            train_targets = trait_targets(load_arrays_file(data).processid, ground_truth)
            measured = grader_metrics.trait_metrics(model, train_targets, valid, root, ground_truth)
            summary["held_out"] = measured
            flat = {f"{split}_{trait}_{k}": v for split, m in measured.items()
                    for trait, row in m["traits"].items() for k, v in row.items() if "baseline" not in k}
        metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
        flat.update({f"final_{k}": float(v) for k, v in summary.items()
                     if k in ("loss", "seconds", "loss_last10_mean") and v is not None})
        tracking._client(uri).log_batch(run_id, metrics=[_metric(k, float(v), summary["steps"])
                                                         for k, v in flat.items()])
    return summary


ABSENT_NAME = "ABSENT.json"  # in a grader folder that could not be trained: why


def skip_trait_reader(out: str | Path, ground_truth: str | Path, metrics_path: Path, plots_path: Path) -> dict:
    """No synthetic ground truth (a real BIOSCAN-5M root): no trait reader; the folder and the metrics say why.

    The DVC outputs still exist (``out/ABSENT.json``, the metrics and an empty
    plot), so the stages after it run; ``evaluate`` reads the reason and
    reports the truth-based metrics as absent.
    """
    reason = (f"no synthetic ground truth at {ground_truth}: the trait reader learns from the synthetic "
              f"benchmark's trait vectors, which real BIOSCAN-5M records do not have")
    dest = Path(out)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / ABSENT_NAME).write_text(json.dumps({"component": "trait_reader", "reason": reason}, indent=2) + "\n")
    summary = {"stage": "train_trait_reader", "skipped": True, "reason": reason, "steps": 0}
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots_path.parent.mkdir(parents=True, exist_ok=True)
    plots_path.write_text("step,loss\n")
    return summary


def absent_reason(folder: str | Path) -> str | None:
    """The reason recorded in a grader folder that holds no model (``ABSENT.json``), else None."""
    p = Path(folder) / ABSENT_NAME
    return json.loads(p.read_text())["reason"] if p.exists() else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Train the judge or the trait reader (Ray Train + MLflow).")
    p.add_argument("--stage", required=True, choices=GRADER_STAGES)
    p.add_argument("--data", required=True, help="arrays file of the training records (pipelines.prepare)")
    p.add_argument("--valid", default="outputs/validation/valid.parquet", help="validated records (held-out splits)")
    p.add_argument("--root", default="data", help="BIOSCAN-5M-layout root holding the images")
    p.add_argument("--ground-truth", default=None,
                   help=f"synthetic ground truth parquet (default: <root>/{TRUTH_RELPATH}; absent: skip the reader)")
    p.add_argument("--out", required=True, help="the final model folder")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", default=None, help="apply params on top of this preset (tests: tiny)")
    p.add_argument("--storage-path", default=None, help="Ray run storage (default: params ray.storage_path)")
    p.add_argument("--metrics-dir", default="metrics")
    p.add_argument("--plots-dir", default="metrics/plots")
    a = p.parse_args(argv)
    summary = run(a.stage, data=a.data, out=a.out, params=a.params, valid=a.valid, root=a.root,
                  ground_truth=a.ground_truth or str(Path(a.root) / TRUTH_RELPATH),
                  metrics_dir=a.metrics_dir, plots_dir=a.plots_dir,
                  preset_name=a.preset, storage_path=a.storage_path)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
