"""The evaluate stage's actor pool: tasks (JSON: barcodes and record indices) in, per-barcode summaries out.

``Grader`` actors hold the pipeline, the judge and the trait reader once and
read real images from arrays the driver put in Ray's object store; they
generate each barcode's rows and grade every row where the images are
(:mod:`g2p.evaluation.grading`). A result travels as JSON (numbers) plus an
``.npz`` of the few images the report shows (loaded with
``allow_pickle=False``).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2p.evaluation import metrics as M
from g2p.evaluation.rows import REGISTRY

TASK_IMAGES = 256  # real images per judge task (threshold pairs, the judge's own accuracy)
SHOWN = 6  # barcodes per split whose images come back for the report's sample sheets


class Grader:
    """A Ray Data actor: evaluation tasks in, per-barcode summaries out; images are made and graded here.

    Holds the pipeline, the judge and the trait reader once (their folders
    travel as bytes through the object store), and reads real images from the
    arrays the driver put in the object store (zero-copy on the same node)."""

    def __init__(self, models: Any, images: dict[str, Any], protos: dict[str, tuple[np.ndarray, np.ndarray]],
                 knobs: dict[str, Any], num_samples: int, seed: int, threads: int) -> None:
        import tempfile

        import diffusers
        import ray

        from g2p.judge import Judge
        from g2p.pipeline import load_pipeline
        from pipelines.predict import _materialise

        diffusers.utils.logging.disable_progress_bar()
        models = ray.get(models) if isinstance(models, ray.ObjectRef) else models
        torch.set_num_threads(threads)
        self._tmp = tempfile.TemporaryDirectory(prefix="g2p-evaluate-")
        root = Path(self._tmp.name)
        pipe = load_pipeline(str(_materialise(models["generator"], root / "generator")))
        self.pipe = pipe.with_scheduler(knobs["scheduler"])
        self.judge = Judge.from_pretrained(_materialise(models["judge"], root / "judge")).eval()
        self.reader = None
        if models.get("trait_reader"):
            from g2p.trait_reader import TraitReader

            self.reader = TraitReader.from_pretrained(_materialise(models["trait_reader"], root / "trait_reader"))
        with warnings.catch_warnings():  # the object store's arrays are read-only: read, never written
            warnings.simplefilter("ignore", UserWarning)
            self.images = {k: torch.from_numpy(ray.get(v) if isinstance(v, ray.ObjectRef) else v)
                           for k, v in images.items()}
        self.protos, self.knobs, self.n, self.seed = protos, knobs, num_samples, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [encode(self.run(json.loads(t))) for t in batch["task"]]
        return {"result": np.array([o[0] for o in out], dtype=object),
                "images": np.array([o[1] for o in out], dtype=object)}

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        from g2p.evaluation.grading import grade_rows, pair_scores
        from g2p.pipeline import generate_uint8

        kind = task["kind"]
        if kind == "pairs":  # the threshold's true and negative pairs (held-out val images, or training images)
            t, s = pair_scores(self.judge, self.images[task["source"]][torch.as_tensor(task["idx"])], task["true"],
                               task["negative"])
            return {"kind": kind, "at": task["at"], "true": t, "negative": s}
        if kind == "split":  # the judge's own species accuracy on real images; the reader's body sizes
            ims = self.images[task["split"]][torch.as_tensor(task["idx"])]
            names, protos = self.protos[task["split"]]
            with torch.no_grad():
                hits = species_hits_of(self.judge, ims, np.asarray(task["species"], dtype=object), names, protos)
            size = self.reader.predict(ims)["body_size"] if self.reader is not None and task["sizes"] else None
            return {"kind": kind, "split": task["split"], "at": task["at"], "hits": hits, "body_size": size}
        split = task["split"]
        arr = self.images[split]
        species = np.asarray(task["species"], dtype=object)
        images: dict[str, torch.Tensor] = {}
        for r in REGISTRY:
            if r.source == "record":
                images[r.name] = arr[torch.as_tensor(task["same_species"])]
            elif r.source == "other_species":
                images[r.name] = arr[torch.as_tensor(task["other_species"])]
            elif r.source == "nearest_barcodes":
                images[r.name] = self.images["train"][torch.as_tensor(task["nearest_barcodes"])]
            else:  # generated: image j of barcode i from image_seed(seed, i, j) in every generated row
                w = self.knobs["aligner_guidance_scale"] if r.aligner else 0.0
                images[r.name] = generate_uint8(
                    self.pipe, task["barcodes"], task["lat"], task["lon"], self.n, self.seed,
                    len(task["barcodes"]) * self.n, seed_index=task["pos"], aligner_guidance_scale=w,
                    num_inference_steps=self.knobs["steps"], guidance_scale=self.knobs["guidance_scale"])
        names, protos = self.protos[split]
        graded = grade_rows(self.judge, self.reader, images, task["barcodes"], species, names, protos)
        shown = [i for i, p in enumerate(task["pos"]) if p < SHOWN]
        keep = {r.name: images[r.name][shown][:, :2 if r.source == "generated" else 1].numpy() for r in REGISTRY}
        return {"kind": kind, "split": split, "pos": task["pos"], "rows": graded,
                "shown": [task["pos"][i] for i in shown], "images": keep,
                "generated": len(task["barcodes"]) * self.n * sum(r.source == "generated" for r in REGISTRY)}


def species_hits_of(judge, images: torch.Tensor, species: np.ndarray, names: np.ndarray,
                    protos: np.ndarray) -> np.ndarray:
    return M.species_hits(judge.embed_images(images).numpy(), species, names, protos)




def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=2.0)


def _plain(v: Any) -> Any:
    """Arrays and numpy scalars as JSON values, through dicts and lists."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def encode(result: dict[str, Any]) -> tuple[str, bytes]:
    """A task's result as (JSON of its numbers, .npz of its shown images: row -> uint8 array)."""
    images = result.get("images") or {}
    buf = io.BytesIO()
    np.savez(buf, **images)
    return json.dumps(_plain({k: v for k, v in result.items() if k != "images"})), buf.getvalue()


def decode(text: str, blob: bytes) -> dict[str, Any]:
    result = json.loads(text)
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        result["images"] = {k: z[k] for k in z.files}
    return result


def run_tasks(tasks: list[str], *, models: dict[str, Any], images: dict[str, np.ndarray],
              protos: dict[str, Any], knobs: dict[str, Any], ecfg, section, total_images: int,
              progress: bool):
    """Yield the actors' results as they come (a Ray Data actor pool over the tasks)."""
    import ray

    from pipelines.ray_train import ensure_ray

    started = not ray.is_initialized()  # a Ray this call starts, it stops (callers in one process go on clean)
    ensure_ray()
    try:
        yield from _pool(tasks, models, images, protos, knobs, ecfg, section, total_images, progress)
    finally:
        if started:
            ray.shutdown()


def _pool(tasks, models, images, protos, knobs, ecfg, section, total_images, progress):
    import ray
    import ray.data

    from pipelines import shards

    shards.data_context(preserve_order=False)
    refs = {k: ray.put(v) for k, v in images.items()}
    actors = min(section.actors(ray.cluster_resources()), len(tasks))
    ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(Grader, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                        num_cpus=section.num_cpus_per_actor, num_gpus=0,
                        fn_constructor_kwargs={"models": ray.put(models), "images": refs, "protos": protos,
                                               "knobs": knobs, "num_samples": ecfg.num_samples, "seed": ecfg.seed,
                                               "threads": max(1, int(section.num_cpus_per_actor))})
    bar = progress_bar(total_images, "evaluate: sampling", progress)
    for r in ds.iter_rows():
        res = decode(r["result"], r["images"])
        bar.update(res.get("generated", 0))
        yield res
    bar.close()
