"""One DVC training stage: Ray Train + MLflow + DVC metrics/plots around :func:`ray_train.run_stage`.

    python -m pipelines.stage --stage train_vae --data outputs/prepared/train \\
        --init-model models/pretrain_conditioner --out models/train_vae

What it adds to ``python -m pipelines.ray_train``:

- a nested MLflow run for the stage under the pipeline's parent
  (:func:`tracking.start_stage_run`), per-step metrics from rank 0
  (:func:`tracking.ray_hooks_factory`), the final model folder as artifacts
  (:func:`tracking.log_checkpoint`), and for the diffusion and aligner stages a
  sample grid from fixed validation barcodes and seeds (driver side);
- ``metrics/<stage>.json`` (final loss, steps, seconds) and
  ``metrics/plots/<stage>.csv`` (step, loss) for ``dvc metrics/plots show``:
  small files Git tracks (``cache: false``, not ignored), so every commit and
  every ``dvc exp run`` experiment carries them and ``dvc exp show``,
  ``dvc metrics diff`` and ``dvc plots diff`` compare them across revisions;
- a Ray run name keyed by what decides the result (stage, config, inputs), so
  a crashed stage resumes from its last checkpoint while a stage re-run with
  other params or inputs starts afresh instead of "resuming" a finished run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

GRID_STAGES = ("train_diffusion", "train_aligner")


def _digest(path: str | Path | None, h: Any) -> None:
    if path is None:
        return
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)


def run_key(stage: str, cfg_json: str, data: str | Path, init_model: str | Path | None, ray: dict) -> str:
    """Short hash of everything that decides a stage's result: the Ray run name's suffix."""
    h = hashlib.sha256(f"{stage}|{cfg_json}|{json.dumps(ray, sort_keys=True)}".encode())
    _digest(data, h)
    _digest(init_model, h)
    # The code too: after a change to the model or the training driver, a finished
    # Ray run of the old code must not be "resumed" (and its model copied).
    root = Path(__file__).resolve().parent.parent
    driver = ("ray_train.py", "ray_worker.py", "stream.py", "shards.py", "storage.py")
    files = sorted((root / "g2p").rglob("*.py")) + [root / "pipelines" / n for n in driver]
    for f in files + [Path(__file__).resolve()]:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def fixed_conditions(arrays: Any, n_species: int = 6) -> list[int]:
    """Indices of the first record of the first ``n_species`` species (sorted names): a fixed panel."""
    first: dict[str, int] = {}
    for i, s in enumerate(arrays.species):
        if s and s not in first:
            first[s] = i
    return [first[s] for s in sorted(first)[:n_species]]


def sample_sheet(pipe: Any, arrays: Any, *, n_species: int = 6, n: int = 4, seed: int = 0,
                 steps: int | None = None) -> Any:
    """A PIL grid, one row per species: the real image, then ``n`` samples of ``pipe`` for its barcode and place."""
    import torch.nn.functional as F

    from g2p.images import grid
    from g2p.pipeline import generate_uint8

    idx = fixed_conditions(arrays, n_species)
    lats = [float(arrays.lat[i]) if bool(arrays.has_place[i]) else None for i in idx]
    lons = [float(arrays.lon[i]) if bool(arrays.has_place[i]) else None for i in idx]
    samples = generate_uint8(pipe, [arrays.barcode[i] for i in idx], lats, lons, n, seed,
                             num_inference_steps=steps)  # (B, n, 3, H, W)
    real = arrays.images[torch.as_tensor(idx)]  # (B, 3, S, S)
    if real.shape[-2:] != samples.shape[-2:]:
        real = F.interpolate(real.float(), size=samples.shape[-2:], mode="bilinear").round().clamp(0, 255).byte()
    rows = torch.cat([real[:, None], samples], dim=1)  # (B, 1 + n, 3, H, W)
    return grid(rows.flatten(0, 1), ncols=1 + n)


def write_dvc_outputs(stage: str, rows: list[dict[str, Any]], seconds: float, metrics_path: Path,
                      plots_path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics_path`` (JSON summary, plus ``extra``) and ``plots_path`` (CSV of step, loss) from the step log."""
    steps = [r for r in rows if r.get("event") == "step"]
    last = steps[-1] if steps else {}
    summary = {"stage": stage, "steps": int(last.get("step", 0)), "loss": last.get("loss"),
               "seconds": round(seconds, 1), **(extra or {})}
    tail = steps[-10:]
    if tail:
        summary["loss_last10_mean"] = sum(r["loss"] for r in tail) / len(tail)
    for key in ("temperature", "global_samples_per_s"):
        if key in last:
            summary[key] = last[key]
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plots_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        for r in steps:
            w.writerow([r["step"], r["loss"]])
    return summary


def run(stage: str, *, data: str, out: str, init_model: str | None, params: str, splits: list[str],
        grid_data: str | None, metrics_dir: str, plots_dir: str, export: str = "training") -> dict[str, Any]:
    from g2p.config import load_params
    from pipelines import tracking
    from pipelines.ray_train import load_data, load_ray_section, run_stage

    cfg = load_params(params)
    if getattr(cfg, stage).steps == 0:
        return skip(stage, cfg, out=out, init_model=init_model, metrics_dir=metrics_dir, plots_dir=plots_dir,
                    export=export)
    scaling = load_ray_section(params)
    name = f"{stage}-{run_key(stage, cfg.to_json(), data, init_model, asdict(scaling))}"
    uri = tracking.tracking_uri()
    with tracking.start_stage_run(stage, cfg) as active:
        run_id = active.info.run_id
        result = run_stage(stage, cfg, data=data, splits=splits, init_model=init_model, run_name=name,
                           scaling=scaling, hooks_factory=tracking.ray_hooks_factory(run_id, uri))
        dest = Path(out)
        if dest.exists():
            shutil.rmtree(dest)
        if export == "pipeline":  # the final model: what G2PDiffusionPipeline.from_pretrained loads
            from g2p.pipeline import convert_checkpoint

            convert_checkpoint(str(result.model_dir), str(dest))
        else:  # a stage's output the next stage continues training from
            shutil.copytree(result.model_dir, dest)
        tracking.log_checkpoint(run_id, dest, uri=uri)
        summary = write_dvc_outputs(stage, result.log(), result.seconds, Path(metrics_dir) / f"{stage}.json",
                                    Path(plots_dir) / f"{stage}.csv")
        summary["ray_run"] = name
        if grid_data and stage in GRID_STAGES:
            from g2p.pipeline import load_pipeline

            pipe = load_pipeline(str(result.model_dir))
            arrays = load_data(grid_data, ["val"], pipe.cfg.vae.image_size)
            sheet = sample_sheet(pipe, arrays)
            tracking._client(uri).log_image(run_id, sheet, key="samples", step=summary["steps"])
        mlflow_final = {f"final_{k}": float(v) for k, v in summary.items()
                        if k in ("loss", "seconds", "loss_last10_mean") and v is not None}
        tracking._client(uri).log_batch(run_id, metrics=[_metric(k, v, summary["steps"])
                                                         for k, v in mlflow_final.items()])
    return summary


def skip(stage: str, cfg: Any, *, out: str, init_model: str | None, metrics_dir: str, plots_dir: str,
         export: str = "training") -> dict[str, Any]:
    """A stage with ``steps: 0``: its output is its input model, unchanged, and no Ray job starts.

    The ``paper`` preset loads Stable Diffusion's VAE and UNet, so its ``train_vae``
    and ``train_base`` have nothing to train. The embedded default trains both
    (without train_base the generator's val species accuracy fell 13 points:
    docs/experiments/README.md, "Time to quality").
    """
    if init_model is None:
        raise ValueError(f"{stage}.steps: 0 (skip the stage) needs --init-model, the model it passes on")
    from pipelines import storage as st
    from pipelines import tracking

    dest = Path(out)
    if dest.exists():
        shutil.rmtree(dest)
    remote = st.is_uri(init_model)
    src = st.download(init_model, dest.with_name(dest.name + ".in")) if remote else Path(init_model)
    if export == "pipeline":
        from g2p.pipeline import convert_checkpoint

        convert_checkpoint(str(src), str(dest))
    else:
        shutil.copytree(src, dest)
    if remote:
        shutil.rmtree(src)
    reason = f"{stage}.steps: 0, the input model passed on unchanged"
    summary = write_dvc_outputs(stage, [], 0.0, Path(metrics_dir) / f"{stage}.json", Path(plots_dir) / f"{stage}.csv",
                                extra={"skipped": True, "reason": reason})
    with tracking.start_stage_run(stage, cfg, log_system_metrics=False) as active:  # the run says why
        tracking._client(tracking.tracking_uri()).set_tag(active.info.run_id, "g2p.skipped", reason)
    return summary


def _metric(key: str, value: float, step: int) -> Any:
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipelines.ray_train import STAGES

    p = argparse.ArgumentParser(description="One training stage of the DVC pipeline (Ray Train + MLflow).")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--data", required=True, help="arrays file (pipelines.prepare)")
    p.add_argument("--splits", nargs="+", default=["train"])
    p.add_argument("--init-model", default=None, help="the previous stage's model folder")
    p.add_argument("--out", required=True, help="the final model folder")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--grid-data", default=None, help="arrays file with images: fixed barcodes for a sample grid")
    p.add_argument("--metrics-dir", default="metrics")
    p.add_argument("--plots-dir", default="metrics/plots")
    p.add_argument("--export", choices=["training", "pipeline"], default="training",
                   help="layout of --out: the training layout the next stage loads, or the "
                        "G2PDiffusionPipeline layout (the final model)")
    a = p.parse_args(argv)
    summary = run(a.stage, data=a.data, out=a.out, init_model=a.init_model, params=a.params, splits=a.splits,
                  grid_data=a.grid_data, metrics_dir=a.metrics_dir, plots_dir=a.plots_dir, export=a.export)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
