"""Framework-free serving core: ``PhenotypeService.predict_batch(requests) -> responses``.

Ray Serve and BentoML are thin fronts over this module.

Batching: requests that share (steps, guidance_scale, cfg_scale) run in ONE
sampler call -- every request contributes ``n`` rows of one batch -- which is
what makes ``@serve.batch`` pay off. A request's images do not depend on what
it is batched with:

- initial noise is drawn per request from its own seed, exactly as
  ``Generator.generate`` draws it for a single barcode
  (``torch.randn((n, C, h, w), generator=manual_seed(seed))``);
- each request is conditioned on its own (no padding to a neighbour's length);
  contexts are padded to the conditioner's fixed maximum token count, so every
  row has the same shape whatever the batch holds;
- aligner guidance contrasts each request's condition only with the negative
  bank (``Generator`` contrasts against the distinct conditions of its batch,
  which for one barcode is that barcode alone): the guidance function is called
  per request slice;
- DDIM (eta = 0) adds no noise after the first draw. DDPM draws noise at every
  step from one generator, so under DDPM every request is sampled on its own.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from g2p.data.dataset import to_uint8
from g2p.diffusion.guidance import make_aligner_cond_fn
from g2p.diffusion.sampler import sample_latents
from g2p.diffusion.schedule import build_sampling_scheduler
from g2p.generate import Generator, to_pil
from g2p.models.vae import decode
from g2p.variation import mutation_series
from serving.config import ServeSection
from serving.schema import ModelInfo, PhenotypeRequest, PhenotypeResponse, VaryRequest, VaryResponse


def png_b64(image: Tensor) -> str:
    """uint8 (3, H, W) -> base64 PNG (deterministic bytes for the same pixels)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class PhenotypeService:
    """A loaded generator (+ optional judge) and what it is: ``info`` = model/data version."""

    generator: Generator
    judge: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    section: ServeSection = field(default_factory=ServeSection)

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_folders(cls, model_dir: str | Path, judge_dir: str | Path | None = None,
                     section: ServeSection | None = None, device: str = "cpu") -> "PhenotypeService":
        """Dev/test path: a generator folder and an optional judge folder."""
        gen = Generator.from_checkpoint(model_dir, device=device)
        judge = None
        if judge_dir is not None and Path(judge_dir).exists():
            from g2p.judge import Judge

            judge = Judge.from_pretrained(judge_dir)  # CPU: it scores the CPU images
        version = folder_version(model_dir, judge_dir)
        info = {"model_version": f"folder:{version}", "data_version": "unknown", "source": str(model_dir)}
        return cls(gen, judge, info, section or ServeSection())

    @classmethod
    def from_registry(cls, uri: str, tracking_uri: str | None = None,
                      section: ServeSection | None = None) -> "PhenotypeService":
        """Production path: ``models:/g2pdiffusion@champion`` through ``pipelines.registry``."""
        from pipelines.registry import load_registered

        model = load_registered(uri, tracking_uri=tracking_uri)
        info = {**dict(model.info), "source": uri}
        info["model_version"] = str(info.get("model_version", "unknown"))
        info["data_version"] = str(info.get("data_version", "unknown"))
        return cls(model.generator, getattr(model, "judge", None), info, section or ServeSection())

    # -- facts ------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return str(self.info.get("model_version", "unknown"))

    @property
    def data_version(self) -> str:
        return str(self.info.get("data_version", "unknown"))

    def model_info(self) -> ModelInfo:
        cfg = self.generator.cfg
        sec = self.section
        return ModelInfo(
            model_version=self.model_version, data_version=self.data_version,
            source=str(self.info.get("source", "")), image_size=cfg.vae.image_size,
            has_judge=self.judge is not None, sampling=dataclasses.asdict(cfg.sampling),
            limits={"max_n": sec.max_n, "max_steps": sec.max_steps, "default_n": sec.default_n,
                    "default_steps": sec.default_steps or cfg.sampling.steps,
                    "max_batch_size": sec.max_batch_size, "request_timeout_s": sec.request_timeout_s},
            extra={k: v for k, v in self.info.items() if k not in ("model_version", "data_version", "source")},
        )

    def resolved(self, r: PhenotypeRequest) -> tuple[int, int, float, float]:
        """(n, steps, guidance_scale, cfg_scale) with defaults filled in."""
        s = self.generator.cfg.sampling
        n = r.n if r.n is not None else self.section.default_n
        steps = r.steps if r.steps is not None else (self.section.default_steps or s.steps)
        w = s.guidance_scale if r.guidance_scale is None else r.guidance_scale
        cfg = s.cfg_scale if r.cfg_scale is None else r.cfg_scale
        return n, steps, float(w), float(cfg)

    # -- generation -------------------------------------------------------------
    @torch.no_grad()
    def generate_images(self, items: Sequence[tuple[str, float | None, float | None, int, int]],
                        steps: int, w: float, cfg_scale: float) -> list[Tensor]:
        """Items (barcode, lat, lon, n, seed) sharing steps/w/cfg -> uint8 (n, 3, H, W) each, one sampler call."""
        m = self.generator.model
        dev = m.device
        ctxs, masks, pooled, noise, sizes = [], [], [], [], []
        for seq, lat, lon, n, seed in items:
            known = torch.tensor([lat is not None])
            c = m.condition([seq], torch.tensor([lat or 0.0]), torch.tensor([lon or 0.0]), known)
            ctxs.append(c.context.expand(n, -1, -1))
            masks.append((c.context_mask if c.context_mask is not None
                           else torch.ones(c.context.shape[:2], dtype=torch.bool, device=dev)).expand(n, -1))
            pooled.append(c.pooled.expand(n, -1))
            g = torch.Generator().manual_seed(int(seed))
            noise.append(torch.randn((n, *m.latent_shape), generator=g, dtype=c.context.dtype))
            sizes.append(n)
        length = self._context_length(max(x.shape[1] for x in ctxs))
        context = torch.cat([_pad(x, length, 0.0) for x in ctxs])  # (N, L, d)
        mask = torch.cat([_pad(x.bool(), length, False) for x in masks])  # (N, L)
        c = torch.cat(pooled)  # (N, d)
        latents = torch.cat(noise).to(dev)  # (N, C, h, w)
        cond_fn = None
        if w != 0:
            base = make_aligner_cond_fn(m.aligner, m.negative_bank.to(dev))

            def cond_fn(x_t: Tensor, t: Tensor, cc: Tensor) -> Tensor:  # per request: its own candidates
                out, i = [], 0
                for k in sizes:
                    out.append(base(x_t[i:i + k], t[i:i + k], cc[i:i + k]))
                    i += k
                return torch.cat(out)

        sched = build_sampling_scheduler(m.cfg.diffusion, m.cfg.sampling)
        z = sample_latents(
            m.denoiser, sched, context, mask, c, latent_shape=m.latent_shape, num_inference_steps=steps,
            num_samples=1, cfg_scale=cfg_scale, guidance_scale=w, cond_fn=cond_fn, latents=latents,
        )  # (N, C, h, w)
        x = to_uint8(decode(m.vae, z)).cpu()  # (N, 3, H, W)
        return list(torch.split(x, sizes))

    def _context_length(self, longest: int) -> int:
        """The fixed context length every row is padded to (the tokenizer's maximum)."""
        m = self.generator.model
        cap = getattr(m.tokenizer, "model_max_length", None)
        if isinstance(cap, int) and longest <= cap <= 4096:
            return cap
        return longest

    def score(self, images: Tensor, barcode: str) -> list[float] | None:
        if self.judge is None:
            return None
        with torch.no_grad():
            s = self.judge.score(images, [barcode] * len(images))
        return [round(float(v), 6) for v in s]

    def predict_batch(self, requests: Sequence[PhenotypeRequest]) -> list[PhenotypeResponse]:
        """Answer several requests; those sharing (steps, w, cfg) share one sampler call."""
        t0 = time.perf_counter()
        knobs = [self.resolved(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        ddpm = self.generator.cfg.sampling.scheduler == "ddpm"
        for i, (n, steps, w, cfg) in enumerate(knobs):
            groups.setdefault((steps, w, cfg, i if ddpm else None), []).append(i)
        images: dict[int, Tensor] = {}
        for (steps, w, cfg, _), idx in groups.items():
            items = [(requests[i].barcode, requests[i].latitude, requests[i].longitude, knobs[i][0],
                      requests[i].seed) for i in idx]
            for i, im in zip(idx, self.generate_images(items, steps, w, cfg)):
                images[i] = im
        elapsed = time.perf_counter() - t0
        out = []
        for i, r in enumerate(requests):
            n, steps, w, cfg = knobs[i]
            out.append(PhenotypeResponse(
                barcode=r.barcode, latitude=r.latitude, longitude=r.longitude, n=n, steps=steps,
                guidance_scale=w, cfg_scale=cfg, seed=r.seed, images=[png_b64(im) for im in images[i]],
                scores=self.score(images[i], r.barcode), model_version=self.model_version,
                data_version=self.data_version, elapsed_s=round(elapsed, 4),
            ))
        return out

    def predict(self, request: PhenotypeRequest) -> PhenotypeResponse:
        return self.predict_batch([request])[0]

    def vary(self, r: VaryRequest) -> VaryResponse:
        """Mutation series (one image per rate) and latitude sweep (one per latitude), one image each."""
        s = self.generator.cfg.sampling
        steps = r.steps or self.section.default_steps or s.steps
        w = s.guidance_scale if r.guidance_scale is None else r.guidance_scale
        cfg = s.cfg_scale if r.cfg_scale is None else r.cfg_scale
        mutants = mutation_series(r.barcode, list(r.rates), seed=r.seed)
        lon = r.longitude if r.longitude is not None else 0.0
        items = [(b, r.latitude, r.longitude, 1, r.seed) for b in mutants]
        items += [(r.barcode, la, lon, 1, r.seed) for la in r.latitudes]
        imgs = self.generate_images(items, steps, float(w), float(cfg))
        mut = [{"rate": rate, "barcode": b, "image": png_b64(im[0]),
                "score": (self.score(im, b) or [None])[0]}
               for rate, b, im in zip(r.rates, mutants, imgs[:len(mutants)])]
        lat = [{"latitude": la, "image": png_b64(im[0]), "score": (self.score(im, r.barcode) or [None])[0]}
               for la, im in zip(r.latitudes, imgs[len(mutants):])]
        return VaryResponse(mutation=mut, latitude=lat, model_version=self.model_version,
                            data_version=self.data_version)


def _pad(x: Tensor, length: int, value: float | bool) -> Tensor:
    """Pad dim 1 of (N, L, ...) to ``length`` with ``value``."""
    if x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


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
        from pipelines.registry import resolve_alias

        name, alias = parse_model_uri(self.model_uri)
        return str(resolve_alias(name, alias, tracking_uri=self.tracking_uri)) if alias else alias_free(self.model_uri)

    def load(self, section: ServeSection) -> PhenotypeService:
        """Load the model; with ``serve.num_gpus`` > 0 and CUDA present the generator goes to the GPU
        (the judge stays where it was loaded; noise is drawn on the CPU either way)."""
        device = "cuda" if section.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.model_dir is not None:
            return PhenotypeService.from_folders(self.model_dir, self.judge_dir, section, device=device)
        svc = PhenotypeService.from_registry(self.model_uri, self.tracking_uri, section)
        if device != "cpu":
            svc.generator.model.to(device)
        return svc


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
