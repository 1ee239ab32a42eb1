"""Framework-free serving core: ``PhenotypeService.predict_batch(requests) -> responses``.

Ray Serve and BentoML are thin fronts over this module; it makes images only
through :class:`g2p.pipeline.G2PDiffusionPipeline`.

Batching: requests that share (steps, guidance_scale, aligner_guidance_scale,
scheduler) run in ONE pipeline call -- every request contributes ``n`` rows --
which is what makes ``@serve.batch`` pay off. A request's images do not depend
on what it is batched with: the pipeline draws noise image by image, so
request r's rows get the generator list ``[manual_seed(seed_r)] * n_r`` and

    pipe([b1] * n1 + [b2] * n2, ..., num_images_per_barcode=1, generator=[g1] * n1 + [g2] * n2)

gives for b1 exactly the images of ``pipe(b1, ..., num_images_per_barcode=n1,
generator=g1)`` (every scheduler, DDPM's per-step noise included). So an HTTP
request's PNGs are those of the pipeline called directly with its barcode,
place, knobs and ``torch.Generator().manual_seed(seed)`` (a request alone in its
group is answered by literally that call).

Exact bytes whatever the batch: the pipeline runs every network on exactly
``micro_batch_size`` rows and steps its chunks in lockstep (see
``G2PDiffusionPipeline.set_micro_batch_size``), so neither a neighbour nor a
chunk boundary changes a row's arithmetic.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from g2p.batch import Knobs, generate_items
from g2p.images import png_bytes
from g2p.pipeline import G2PDiffusionPipeline, load_pipeline
from g2p.variation import variation_images
from serving.config import ServeSection
from serving.schema import ModelInfo, PhenotypeResponse, VaryResponse, request_models


def png_b64(image: Tensor) -> str:
    """uint8 (3, H, W) -> base64 PNG (deterministic bytes for the same pixels)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


@dataclass
class PhenotypeService:
    """A loaded pipeline (+ optional judge) and what it is: ``info`` = model/data version."""

    pipeline: G2PDiffusionPipeline
    judge: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    section: ServeSection = field(default_factory=ServeSection)
    _pipes: dict[str, G2PDiffusionPipeline] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_folders(cls, model_dir: str | Path, judge_dir: str | Path | None = None,
                     section: ServeSection | None = None, device: str = "cpu") -> "PhenotypeService":
        """Dev/test path: a pipeline folder (or an old-format generator folder) and an optional judge folder."""
        pipe = load_pipeline(str(model_dir), device=device)
        judge = None
        if judge_dir is not None and Path(judge_dir).exists():
            from g2p.judge import Judge

            judge = Judge.from_pretrained(judge_dir)  # CPU: it scores the CPU images
        version = folder_version(model_dir, judge_dir)
        info = {"model_version": f"folder:{version}", "data_version": "unknown", "source": str(model_dir)}
        return cls(pipe, judge, info, section or ServeSection())

    @classmethod
    def from_registry(cls, uri: str, tracking_uri: str | None = None, section: ServeSection | None = None,
                      device: str | None = None) -> "PhenotypeService":
        """Production path: ``models:/g2pdiffusion@champion`` (an alias is resolved first, so the info
        names exactly the version loaded even if the alias moves meanwhile)."""
        model, info = load_registered(uri, tracking_uri, device=device)
        info = {**info, "source": uri}
        info["model_version"] = str(info.get("model_version", "unknown"))
        info["data_version"] = str(info.get("data_version", "unknown"))
        return cls(model.pipeline, getattr(model, "judge", None), info, section or ServeSection())

    # -- facts ------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return str(self.info.get("model_version", "unknown"))

    @property
    def data_version(self) -> str:
        return str(self.info.get("data_version", "unknown"))

    def model_info(self) -> ModelInfo:
        from serving.schema import SCHEDULER_NAMES

        cfg = self.pipeline.cfg
        sec = self.section
        return ModelInfo(
            model_version=self.model_version, data_version=self.data_version,
            source=str(self.info.get("source", "")), image_size=cfg.vae.image_size,
            has_judge=self.judge is not None, sampling=dataclasses.asdict(cfg.sampling),
            limits={"max_n": sec.max_n, "max_steps": sec.max_steps, "default_n": sec.default_n,
                    "default_steps": sec.default_steps or cfg.sampling.steps,
                    "max_batch_size": sec.max_batch_size, "request_timeout_s": sec.request_timeout_s,
                    "max_vary_rates": sec.max_vary_rates, "schedulers": list(SCHEDULER_NAMES)},
            extra={k: v for k, v in self.info.items() if k not in ("model_version", "data_version", "source")},
        )

    def knobs(self, r: Any) -> Knobs:
        """A request's (steps, guidance_scale, aligner_guidance_scale, scheduler), defaults filled in."""
        s = self.pipeline.cfg.sampling
        steps = r.steps if r.steps is not None else (self.section.default_steps or s.steps)
        cfg = s.guidance_scale if r.guidance_scale is None else r.guidance_scale
        w = s.aligner_guidance_scale if r.aligner_guidance_scale is None else r.aligner_guidance_scale
        return Knobs(int(steps), float(cfg), float(w), r.scheduler or s.scheduler)

    def pipe_for(self, scheduler: str) -> G2PDiffusionPipeline:
        """The pipeline with ``scheduler``: the loaded one, or a cached sibling sharing its modules."""
        if scheduler == self.pipeline.cfg.sampling.scheduler:
            return self.pipeline
        with self._lock:
            if scheduler not in self._pipes:
                self._pipes[scheduler] = self.pipeline.with_scheduler(scheduler)
            return self._pipes[scheduler]

    # -- generation -------------------------------------------------------------
    def generate_images(self, items: Sequence[tuple[str, float | None, float | None, int, int]],
                        knobs: Knobs) -> list[Tensor]:
        """Items (barcode, lat, lon, n, seed) sharing ``knobs`` -> uint8 (n, 3, H, W) each, in one pipeline call
        (:func:`g2p.batch.generate_items`)."""
        return generate_items(self.pipe_for(knobs.scheduler), items, knobs)

    def score(self, images: Tensor, barcodes: Sequence[str]) -> list[float] | None:
        if self.judge is None:
            return None
        with torch.no_grad():
            s = self.judge.score(images, list(barcodes))
        return [round(float(v), 6) for v in s]

    def predict_batch(self, requests: Sequence[Any]) -> list[PhenotypeResponse]:
        """Answer several requests; those sharing their knobs share one pipeline call."""
        t0 = time.perf_counter()
        knobs = [self.knobs(r) for r in requests]
        ns = [r.n if r.n is not None else self.section.default_n for r in requests]
        groups: dict[Knobs, list[int]] = {}
        for i, k in enumerate(knobs):
            groups.setdefault(k, []).append(i)
        images: dict[int, Tensor] = {}
        for k, idx in groups.items():
            items = [(requests[i].barcode, requests[i].latitude, requests[i].longitude, ns[i], requests[i].seed)
                     for i in idx]
            for i, im in zip(idx, self.generate_images(items, k)):
                images[i] = im
        elapsed = time.perf_counter() - t0
        out = []
        for i, r in enumerate(requests):
            k = knobs[i]
            out.append(PhenotypeResponse(
                barcode=r.barcode, latitude=r.latitude, longitude=r.longitude, n=ns[i], steps=k.steps,
                guidance_scale=k.guidance_scale, aligner_guidance_scale=k.aligner_guidance_scale,
                scheduler=k.scheduler, seed=r.seed, images=[png_b64(im) for im in images[i]],
                scores=self.score(images[i], [r.barcode] * ns[i]), model_version=self.model_version,
                data_version=self.data_version, elapsed_s=round(elapsed, 4), batch_size=len(requests),
            ))
        return out

    def predict(self, request: Any) -> PhenotypeResponse:
        return self.predict_batch([request])[0]

    def parse(self, data: Any) -> Any:
        """A request dict validated with this service's section (``serving.schema.request_models``)."""
        return request_models(self.section).phenotype.model_validate(data)

    def vary(self, r: Any) -> VaryResponse:
        """Mutation series (one image per rate) and latitude sweep (one per latitude), through
        ``g2p.variation.variation_images``: every variant shares the same noise."""
        k = self.knobs(r)
        v = variation_images(self.pipe_for(k.scheduler), [r.barcode], [r.latitude], [r.longitude],
                             rates=list(r.rates), sweep=list(r.latitudes), num_images=1, seed=int(r.seed),
                             num_inference_steps=k.steps, guidance_scale=k.guidance_scale,
                             aligner_guidance_scale=k.aligner_guidance_scale)
        mut_imgs = v.mutation[0, :, 0]  # (R, 3, H, W)
        lat_imgs = v.latitude[0, :, 0]  # (L, 3, H, W)
        mut_scores = self.score(mut_imgs, v.mutants[0]) or [None] * len(v.rates)
        lat_scores = self.score(lat_imgs, [r.barcode] * len(v.latitudes)) or [None] * len(v.latitudes)
        mut = [{"rate": rate, "barcode": b, "image": png_b64(im), "score": s}
               for rate, b, im, s in zip(v.rates, v.mutants[0], mut_imgs, mut_scores)]
        lat = [{"latitude": la, "image": png_b64(im), "score": s}
               for la, im, s in zip(v.latitudes, lat_imgs, lat_scores)]
        return VaryResponse(mutation=mut, latitude=lat, steps=k.steps, guidance_scale=k.guidance_scale,
                            aligner_guidance_scale=k.aligner_guidance_scale, scheduler=k.scheduler,
                            seed=r.seed, model_version=self.model_version, data_version=self.data_version)


def folder_version(model_dir: str | Path, judge_dir: str | Path | None = None) -> str:
    """A short fingerprint of a model folder's weights (size + mtime of each safetensors file)."""
    h = hashlib.sha256()
    for d in (model_dir, judge_dir):
        if d is None or not Path(d).exists():
            continue
        for f in sorted(Path(d).rglob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.relative_to(d)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------
# where a model comes from, and whether it changed
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A registry URI (``models:/name@alias``) or a generator folder (+ judge folder)."""

    model_uri: str | None = None
    model_dir: str | None = None
    judge_dir: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        if (self.model_uri is None) == (self.model_dir is None):
            raise ValueError("model source: give exactly one of model_uri or model_dir")

    def current_version(self) -> str:
        """The version a fresh load would get now (cheap: a registry lookup or a stat)."""
        if self.model_dir is not None:
            return f"folder:{folder_version(self.model_dir, self.judge_dir)}"
        name, alias = parse_model_uri(self.model_uri)
        return resolve_alias(name, alias, self.tracking_uri) if alias else alias_free(self.model_uri)

    def load(self, section: ServeSection) -> PhenotypeService:
        """Load the model; with ``serve.num_gpus`` > 0 and CUDA present the pipeline goes to the GPU
        (the judge stays where it was loaded; noise is drawn on the CPU either way)."""
        device = "cuda" if section.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.model_dir is not None:
            return PhenotypeService.from_folders(self.model_dir, self.judge_dir, section, device=device)
        return PhenotypeService.from_registry(self.model_uri, self.tracking_uri, section, device=device)


# ----------------------------------------------------------------------------
# the MLflow registry, called directly (serving does not import pipelines/)
# ----------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the repository's sqlite store (as ``pipelines.tracking`` has it): the
    checkout's, or from an installed wheel the current directory's."""
    root = Path(__file__).resolve().parents[1]
    root = root if (root / "dvc.yaml").exists() else Path.cwd()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def _client(tracking_uri: str | None) -> Any:
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def resolve_alias(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version number (as a string) that ``name@alias`` points at; ValueError if none."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise ValueError(f"alias: no version of model {name!r} has alias {alias!r}") from None


def load_registered(uri: str, tracking_uri: str | None = None, device: str | None = None) -> tuple[Any, dict]:
    """``mlflow.pyfunc.load_model(uri).unwrap_python_model()`` (it has ``.pipeline``, ``.judge``, ``.info``)
    and its info with ``model_version`` filled in; an alias is resolved to its version first."""
    import mlflow

    _client(tracking_uri)  # sets the tracking and registry URIs
    name, alias = parse_model_uri(uri)
    rest = uri[len("models:/"):]
    version = resolve_alias(name, alias, tracking_uri) if alias else (rest.split("/", 1) + [""])[1] or None
    saved = os.environ.get("G2P_DEVICE")
    if device is not None:
        os.environ["G2P_DEVICE"] = device  # the pyfunc's load_context reads it
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}" if version else uri).unwrap_python_model()
    finally:
        if device is not None:
            if saved is None:
                os.environ.pop("G2P_DEVICE", None)
            else:
                os.environ["G2P_DEVICE"] = saved
    info = {**dict(model.info), "model_uri": uri, "model_name": name}
    if version:
        info["model_version"] = version
    return model, info


def parse_model_uri(uri: str) -> tuple[str, str | None]:
    """``models:/name@alias`` -> (name, alias); ``models:/name/3`` -> (name, None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"model_uri: {uri!r} is not a models:/ URI")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias
    return rest.split("/", 1)[0], None


def alias_free(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]
