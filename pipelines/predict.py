"""``g2p predict``: phenotype images for a whole table of barcodes, as a Ray Data batch-inference job.

    g2p predict --model models:/g2pdiffusion@champion --input new_barcodes.parquet \\
        --output s3://bucket/predictions?endpoint_override=...  --num-images 4

Input: a Parquet file or folder, or a CSV file (``.csv``, ``.csv.gz``), at a
path or URI, with a ``barcode`` column and optional ``latitude``,
``longitude`` and ``seed`` columns (``--column barcode=dna_barcode`` maps
other names); every other column (ids) is carried through.

Output, at a path or URI: ``part-NNNNNN.parquet`` files, one per
``predict.rows_per_shard`` input rows, with ``num_images`` records per input
row, in input order: the input's columns, ``sample`` (image index), ``seed``
(the seed used: the row's, or ``--seed`` + the row's number), ``image`` (PNG
bytes), ``score`` (the judge's CLIBDScore, when the model has a judge),
``model_version``, the knobs (``steps``, ``guidance_scale``,
``aligner_guidance_scale``, ``scheduler``) and ``error``: null, or for a row
whose barcode, place or seed is invalid, the field and the value (its
``image`` is null). Rows in x ``num_images`` = records out.

Image ``j`` of a row is image ``j`` of ``pipe(barcode, latitude, longitude,
num_images_per_barcode=n, generator=torch.Generator().manual_seed(seed))``
alone, byte for byte (:func:`g2p.batch.generate_items`; the same
``micro_batch_size``), whichever rows it is batched with and whichever actor
makes it.

How it runs: the driver streams the input once into ``_input/`` shards at the
output location (bounded memory; a cluster's workers read them from there, so
the input may sit on the driver's disk), then a Ray Data actor pool (the
``predict`` section of ``params.yaml``) loads the model once per actor (the
folder travels through the object store: no shared disk needed) and turns
each input shard into its output file; only a few numbers per shard come back
to the driver (progress with rate and ETA). A rerun with the same request
skips the shards already written: a file appears whole (written aside and
renamed; an object store's PUT is atomic) or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from g2p.config import ConfigError, _build
from pipelines import storage
from pipelines.predict_files import (
    INPUT, count_errors, fingerprint, input_files, part_name, read_json, stage_input, write_atomic, write_json,
    written_shards,
)

REQUEST = "_predict.json"
PLACE_COLUMNS = ("barcode", "latitude", "longitude", "seed")



@dataclass(frozen=True)
class PredictSection:
    """The ``predict`` key of ``params.yaml``: how a batch prediction spreads over a Ray cluster.

    ``concurrency``: actors (0 = one per GPU when actors take GPUs, else one
    per CPU of the cluster); each holds the model once. ``batch_size``: images
    per pipeline call in an actor (rows are batched across barcodes).
    ``rows_per_shard``: input rows per output file, the unit of progress and
    of resume. ``micro_batch_size``: images per network call (0 = the
    model's); an image is byte-identical between runs with the same value, so
    raise it on GPUs and keep it across reruns. ``bf16``: the networks in
    bfloat16 on GPU (CPU stays float32).
    """

    concurrency: int = 0
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 16
    rows_per_shard: int = 512
    micro_batch_size: int = 0
    bf16: bool = True

    def __post_init__(self) -> None:
        for key, ok in (("concurrency", self.concurrency >= 0), ("num_cpus_per_actor", self.num_cpus_per_actor > 0),
                        ("num_gpus_per_actor", self.num_gpus_per_actor >= 0), ("batch_size", self.batch_size >= 1),
                        ("rows_per_shard", self.rows_per_shard >= 1),
                        ("micro_batch_size", self.micro_batch_size >= 0)):
            if not ok:
                raise ConfigError(f"predict.{key}: invalid value {getattr(self, key)!r}")

    def actors(self, cluster: dict[str, float]) -> int:
        if self.concurrency:
            return self.concurrency
        if self.num_gpus_per_actor > 0:
            return max(1, int(cluster.get("GPU", 0) // self.num_gpus_per_actor))
        # one CPU is left to Ray Data's own tasks (a local Ray counts one beyond the cores for them)
        return max(1, int((cluster.get("CPU", 1) - 1) // self.num_cpus_per_actor))


def load_section(path: str | Path = "params.yaml") -> PredictSection:
    import yaml

    p = Path(path)
    raw = (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
    return _build(PredictSection, raw.get("predict") or {}, "predict")


# ----------------------------------------------------------------------------
# the model: a folder or a registered version, shipped to the actors as bytes
# ----------------------------------------------------------------------------


@dataclass
class ModelFolders:
    generator: Path
    judge: Path | None
    version: str


def resolve_model(model: str, judge: str | None, workdir: Path, tracking_uri: str | None = None) -> ModelFolders:
    """A pipeline folder (``judge``: an optional Judge folder) or ``models:/NAME@ALIAS`` / ``models:/NAME/V``
    (the registered pyfunc's generator and bundled judge, downloaded into ``workdir``)."""
    if not model.startswith("models:/"):
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model: {model!r} is neither a folder nor a models:/ URI")
        if judge is not None and not Path(judge).is_dir():
            raise FileNotFoundError(f"judge: {judge!r} is not a folder")
        from serving.core import folder_version

        return ModelFolders(Path(model), Path(judge) if judge else None, f"folder:{folder_version(model, judge)}")
    import mlflow
    import yaml

    from pipelines.registry import _client, resolve_alias

    _client(tracking_uri)  # sets the tracking and registry URIs
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model)
    if not m:
        raise ValueError(f"model: {model!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    name, version = m.group(1), m.group(3) or resolve_alias(m.group(1), m.group(2), tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                     dst_path=str(workdir)))
    arts = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"].get("artifacts", {})
    gen = local / arts["generator"]["path"]
    jd = local / arts["judge"]["path"] if "judge" in arts and (local / arts["judge"]["path"]).is_dir() else None
    if judge is not None:
        jd = Path(judge)
    return ModelFolders(gen, jd, f"{name}/{version}")


def _folder_bytes(folder: Path | None) -> dict[str, bytes] | None:
    if folder is None:
        return None
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _materialise(files: dict[str, bytes], dest: Path) -> Path:
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    return dest


# ----------------------------------------------------------------------------
# the actor
# ----------------------------------------------------------------------------


class Predictor:
    """A Ray Data actor: input shards in, output files written, a few numbers per shard back."""

    def __init__(self, model: Any, out: str, knobs: dict[str, Any], num_images: int, seed: int, section: dict,
                 columns: dict[str, str]) -> None:
        import diffusers
        import ray
        import torch

        from g2p.batch import Knobs
        from g2p.pipeline import load_pipeline

        diffusers.utils.logging.disable_progress_bar()  # one bar per component load, per actor: noise

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        sec = PredictSection(**section)
        cuda = sec.num_gpus_per_actor > 0 and torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        if not cuda:
            torch.set_num_threads(max(1, int(sec.num_cpus_per_actor)))
        self._tmp = tempfile.TemporaryDirectory(prefix="g2p-predict-")
        root = Path(self._tmp.name)
        gen = _materialise(model["generator"], root / "generator")
        dtype = torch.bfloat16 if cuda and sec.bf16 else None
        pipe = load_pipeline(str(gen), device=device, dtype=dtype)
        if sec.micro_batch_size:
            pipe.set_micro_batch_size(sec.micro_batch_size)
        self.knobs = Knobs(**knobs)
        self.pipe = pipe.with_scheduler(self.knobs.scheduler) if self.knobs.scheduler != pipe.cfg.sampling.scheduler \
            else pipe
        self.judge = None
        if model.get("judge"):
            from g2p.judge import Judge

            self.judge = Judge.from_pretrained(_materialise(model["judge"], root / "judge"), device=device).eval()
        self.version, self.out, self.n, self.seed = model["version"], out, num_images, seed
        self.batch, self.columns = sec.batch_size, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [self.shard(int(s), int(r0)) for s, r0 in zip(batch["shard"], batch["row_start"])]
        return {k: np.asarray([s[k] for s in stats]) for k in ("shard", "rows", "images", "errors", "seconds", "pid")}

    def shard(self, index: int, row_start: int) -> dict[str, Any]:
        from g2p.batch import predict_rows

        t0 = time.perf_counter()
        fs, base = storage.filesystem(self.out)
        table = pq.read_table(f"{base}/{INPUT}/{part_name(index)}", filesystem=fs)
        view = {role: table.column(col).to_pylist() for role, col in self.columns.items() if col in table.schema.names}
        rows = [{k: v[i] for k, v in view.items()} for i in range(table.num_rows)]
        recs = predict_rows(self.pipe, self.judge, rows, self.knobs, self.n, self.batch,
                            [self.seed + row_start + i for i in range(table.num_rows)])
        out = output_table(table, recs, self.n, self.columns.get("seed"), self.version, self.knobs)
        write_atomic(fs, f"{base}/{part_name(index)}", out)
        errors = sum(r["error"] is not None for r in recs)
        return {"shard": index, "rows": table.num_rows, "images": len(recs) - errors, "errors": errors,
                "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def output_table(table: pa.Table, recs: list[dict[str, Any]], n: int, seed_column: str | None, version: str,
                 knobs: Any) -> pa.Table:
    """The input rows, each repeated ``n`` times, with the added columns (the input's seed column replaced
    by the seed used)."""
    out = table.take(pa.array(np.repeat(np.arange(table.num_rows), n)))
    if seed_column and seed_column in out.schema.names:
        out = out.drop_columns([seed_column])
    m = len(recs)
    cols = {
        "sample": pa.array([r["sample"] for r in recs], pa.int32()),
        "seed": pa.array([r["seed"] for r in recs], pa.int64()),
        "image": pa.array([r["image"] for r in recs], pa.binary()),
        "score": pa.array([r["score"] for r in recs], pa.float64()),
        "model_version": pa.array([version] * m, pa.string()),
        "steps": pa.array([knobs.steps] * m, pa.int32()),
        "guidance_scale": pa.array([knobs.guidance_scale] * m, pa.float64()),
        "aligner_guidance_scale": pa.array([knobs.aligner_guidance_scale] * m, pa.float64()),
        "scheduler": pa.array([knobs.scheduler] * m, pa.string()),
        "error": pa.array([r["error"] for r in recs], pa.string()),
    }
    for name, col in cols.items():
        out = out.append_column(name, col)
    return out


# ----------------------------------------------------------------------------
# the driver: stage the input, skip what is done, run the pool
# ----------------------------------------------------------------------------


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="predict", unit="img", disable=not enabled, mininterval=5.0,
                file=sys.stderr)


def predict(*, model: str, input: str, output: str, num_images: int = 1, steps: int | None = None,
            guidance_scale: float | None = None, aligner_guidance_scale: float | None = None,
            scheduler: str | None = None, seed: int = 0, judge: str | None = None,
            columns: dict[str, str] | None = None, section: PredictSection = PredictSection(),
            overwrite: bool = False, progress: bool = True, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run (or resume) a batch prediction; a summary (rows, records, errors, shards written and skipped,
    images/s). See the module docstring."""
    import ray

    from g2p.batch import Knobs
    from g2p.pipeline import saved_config

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images: {num_images!r} must be an integer >= 1")
    cols = {role: role for role in PLACE_COLUMNS}
    for role, name in (columns or {}).items():
        if role not in PLACE_COLUMNS:
            raise ValueError(f"column: {role!r} is not one of {list(PLACE_COLUMNS)}")
        cols[role] = name
    out = storage.resolve(output)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="g2p-predict-model-") as work:
        src = resolve_model(model, judge, Path(work), tracking_uri)
        knobs = Knobs(steps, guidance_scale, aligner_guidance_scale, scheduler).resolved(
            saved_config(str(src.generator)).sampling)
        if knobs.steps < 1:
            raise ValueError(f"steps: {knobs.steps!r} must be at least 1")
        fs, files, _ = input_files(input)
        request = {"model_version": src.version, "knobs": dataclasses.asdict(knobs), "num_images": num_images,
                   "seed": seed, "columns": cols, "micro_batch_size": section.micro_batch_size,
                   "rows_per_shard": section.rows_per_shard, "input": fingerprint(fs, files)}
        ofs, obase = storage.filesystem(out)
        previous = read_json(ofs, f"{obase}/{REQUEST}")
        if previous is not None and overwrite:
            ofs.delete_dir_contents(obase, missing_dir_ok=True)
            previous = None
        if previous is not None and previous != request:
            diff = next(k for k in request if previous.get(k) != request[k])
            raise ValueError(f"output: {output!r} holds a prediction made with another {diff} "
                             f"({previous.get(diff)!r}, now {request[diff]!r}); choose another --output or "
                             f"pass --overwrite")
        ofs.create_dir(obase, recursive=True)
        write_json(ofs, f"{obase}/{REQUEST}", request)
        for stale in Path(obase).glob(".part-*.tmp-*") if not storage.is_uri(out) else ():
            stale.unlink()  # what an interrupted writer left
        staged = stage_input(input, out, section.rows_per_shard, cols, progress)
        done = written_shards(out) & set(range(staged["shards"]))
        todo = [i for i in range(staged["shards"]) if i not in done]
        rps = staged["rows_per_shard"]
        total_images = staged["rows"] * num_images
        done_images = sum(min(rps, staged["rows"] - i * rps) for i in done) * num_images
        summary: dict[str, Any] = {"rows": staged["rows"], "records": total_images, "shards": staged["shards"],
                                   "shards_skipped": len(done), "shards_written": 0, "images": 0,
                                   "model_version": src.version, "output": output}
        started = bool(todo) and not ray.is_initialized()  # a Ray this call starts, it stops
        try:
            if todo:
                summary.update(_run_pool(todo, src, out, knobs, num_images, seed, section, cols, rps, total_images,
                                         done_images, progress))
        finally:
            if started:
                ray.shutdown()
    summary["errors"] = count_errors(out, staged["shards"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _run_pool(todo: list[int], src: ModelFolders, out: str, knobs: Any, num_images: int, seed: int,
              section: PredictSection, cols: dict[str, str], rps: int, total_images: int, done_images: int,
              progress: bool) -> dict[str, Any]:
    """The actor pool over the shards still to write; what it did (files, images, rates, actors)."""
    import ray
    import ray.data

    from pipelines import shards
    from pipelines.ray_train import ensure_ray

    ensure_ray()
    shards.data_context(preserve_order=False)
    payload = ray.put({"generator": _folder_bytes(src.generator), "judge": _folder_bytes(src.judge),
                       "version": src.version})
    actors = min(section.actors(ray.cluster_resources()), len(todo))
    ds = ray.data.from_items([{"shard": i, "row_start": i * rps} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(Predictor, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                        num_cpus=section.num_cpus_per_actor, num_gpus=section.num_gpus_per_actor,
                        fn_constructor_kwargs={"model": payload, "out": out, "knobs": dataclasses.asdict(knobs),
                                               "num_images": num_images, "seed": seed,
                                               "section": dataclasses.asdict(section), "columns": cols})
    bar = _progress_bar(total_images, done_images, progress)
    t1 = time.perf_counter()
    written, images, busy = 0, 0, {}
    for r in ds.iter_rows():
        written += 1
        images += int(r["images"])
        busy[int(r["pid"])] = busy.get(int(r["pid"]), 0.0) + float(r["seconds"])
        bar.update(int(r["images"]) + int(r["errors"]))
    bar.close()
    # images/s of the whole pool run (actor start-up included), and while the actors worked
    # (images / the busiest actor's seconds of shard work: start-up and the idle tail left out)
    return {"shards_written": written, "images": images,
            "images_per_s": round(images / max(time.perf_counter() - t1, 1e-9), 3),
            "images_per_busy_s": round(images / max(max(busy.values()), 1e-9), 3), "actors": actors}


def parse_columns(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        role, sep, name = it.partition("=")
        if not sep or not name:
            raise ValueError(f"--column: {it!r} must be ROLE=NAME (e.g. barcode=dna_barcode)")
        out[role] = name
    return out
