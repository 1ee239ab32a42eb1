"""``G2PDiffusionPipeline``: the one way images are made (Algorithm 1), as a diffusers pipeline.

    from g2p import G2PDiffusionPipeline
    pipe = G2PDiffusionPipeline.from_pretrained("models/g2pdiffusion")
    out = pipe("ACGT...", latitude=45.0, longitude=-75.0, num_images_per_barcode=4,
               generator=torch.Generator().manual_seed(0))
    out.images  # 4 PIL images

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Components (``model_index.json``, one folder each, safetensors + JSON configs):
``tokenizer`` (:class:`~g2p.tokenizer.KmerTokenizer`), ``conditioner``
(:class:`ConditionerModel`: the BERT conditioner and the learned null context
of classifier-free guidance), ``vae`` (``AutoencoderKL``), ``unet``
(``UNet2DConditionModel``, LoRA fused in; its ``class_embedding`` is the
pooled-condition embedding when the model has one), ``aligner``
(:class:`AlignerModel`: the aligner and the negative bank its guidance
contrasts against) and ``scheduler``. The model's whole :class:`G2PConfig`
(sampling defaults included) travels in ``model_index.json`` as ``g2p_config``.

Vocabulary: ``guidance_scale`` is classifier-free guidance, as in every
diffusers pipeline; the paper's aligner strength w is ``aligner_guidance_scale``.

An image depends only on its own barcode, place, knobs and generator:

- every barcode is tokenized to the tokenizer's fixed maximum length, so no
  shape depends on a neighbour; the conditioner and UNet treat rows alone;
- noise is drawn image by image: ``generator`` is one ``torch.Generator`` used
  for every image in turn, or a list with one per image (as in diffusers); a
  stochastic scheduler's per-step noise is drawn the same way;
- the aligner's contrast is the image's own condition against the negative
  bank, never its batch neighbours.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see below)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

# Folders saved before g2p.components existed name ("g2p.pipeline", "ConditionerModel") in model_index.json;
# diffusers then looks up both the class and its base (ModelMixin) in this module, so both are here.
from g2p.components import (  # noqa: F401
    AlignerModel, ConditionerModel, alpha_bar_at, build_scheduler, check_scheduler, current_alpha_bar,
)
from g2p.config import G2PConfig, _to_plain
from g2p.data.dataset import to_uint8
from g2p.data.normalise import check_barcode, check_coordinates
from g2p.diffusion.guidance import CondFn, condition_score
from g2p.diffusion.schedule import SCHEDULERS
from g2p.models.conditioner import ConditionerOutput
from g2p.models.unet import pool_context
from g2p.models.vae import decode
from g2p.tokenizer import KmerTokenizer, max_tokens

__all__ = ["G2PDiffusionPipeline", "G2PDiffusionPipelineOutput", "ConditionerModel", "AlignerModel",
           "SCHEDULERS", "build_scheduler", "check_scheduler", "current_alpha_bar", "load_pipeline"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class G2PDiffusionPipelineOutput(BaseOutput):
    """``images``: PIL images, or an array / tensor (N, H, W, 3) / (N, 3, H, W), or latents; N = B x n,
    image ``i * n + j`` is the j-th image of barcode i."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor


# ----------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------


class G2PDiffusionPipeline(DiffusionPipeline):
    """Barcode + place -> phenotype images: conditioner -> guided latent diffusion -> VAE decode."""

    model_cpu_offload_seq = "conditioner->aligner->unet->vae"
    _optional_components: list[str] = []

    def __init__(self, tokenizer: KmerTokenizer, conditioner: ConditionerModel, vae: AutoencoderKL,
                 unet: UNet2DConditionModel, aligner: AlignerModel, scheduler: SchedulerMixin,
                 g2p_config: dict[str, Any] | None = None, micro_batch_size: int = 4) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, conditioner=conditioner, vae=vae, unet=unet, aligner=aligner,
                              scheduler=scheduler)
        self.register_to_config(g2p_config=g2p_config)
        self.set_micro_batch_size(micro_batch_size)
        self.cfg = G2PConfig.from_dict(g2p_config) if g2p_config else G2PConfig()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scheduler" and value is not None:
            check_scheduler(value)  # refuse at assignment, not mid-sampling
        super().__setattr__(name, value)

    # -- facts ---------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    @property
    def context_length(self) -> int:
        """Tokens per barcode: the tokenizer's fixed maximum ([ENV] + k-mers of the longest barcode)."""
        t = self.tokenizer
        return max_tokens(t.k, t.stride, t.max_nucleotides)

    # -- the steps of a call, each callable alone -------------------------------------
    def check_inputs(self, barcode: str | Sequence[str], latitude: Any, longitude: Any, num_images_per_barcode: int,
                     num_inference_steps: int, guidance_scale: float, aligner_guidance_scale: float,
                     output_type: str) -> tuple[list[str], list[tuple[float | None, float | None]]]:
        """Normalised barcodes and places; ``ValueError`` naming the field and the value, before any compute."""
        if isinstance(barcode, str):
            barcodes, single = [barcode], True
        elif isinstance(barcode, Sequence) and len(barcode) > 0:
            barcodes, single = list(barcode), False
        else:
            raise ValueError(f"barcode: {barcode!r} must be a string or a non-empty list of strings")
        seqs = [check_barcode(b, field="barcode" if single else f"barcode[{i}]") for i, b in enumerate(barcodes)]
        lats = _per_barcode(latitude, len(seqs), "latitude")
        lons = _per_barcode(longitude, len(seqs), "longitude")
        places = []
        for i, (la, lo) in enumerate(zip(lats, lons)):
            try:
                places.append(check_coordinates(la, lo))
            except ValueError as e:
                raise ValueError(str(e) if single else f"[{i}] {e}") from None
        for name, v, lo in (("num_images_per_barcode", num_images_per_barcode, 1),
                            ("num_inference_steps", num_inference_steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: {v!r} must be an integer >= {lo}")
        for name, v in (("guidance_scale", guidance_scale), ("aligner_guidance_scale", aligner_guidance_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: {v!r} must be a finite number >= 0")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: {output_type!r} is not one of {list(OUTPUT_TYPES)}")
        return seqs, places

    def encode_condition(self, barcodes: Sequence[str],
                         places: Sequence[tuple[float | None, float | None]]) -> ConditionerOutput:
        """Context (B, L, d), mask (B, L) and pooled c (B, d), every barcode at the fixed token length,
        in conditioner calls of exactly ``micro_batch_size`` rows (see :meth:`set_micro_batch_size`)."""
        dev = self.device
        enc = self.tokenizer(list(barcodes), padding="max_length", max_length=self.context_length,
                             truncation=True, return_tensors="pt")
        lat = torch.tensor([p[0] if p[0] is not None else 0.0 for p in places])
        lon = torch.tensor([p[1] if p[1] is not None else 0.0 for p in places])
        known = torch.tensor([p[0] is not None for p in places])
        inputs = [enc["input_ids"], enc["attention_mask"], lat, lon, known]
        outs = [self.conditioner(*[x.to(dev) for x in chunk]) for chunk in _fixed_chunks(inputs, self.micro_batch_size)]
        num = len(barcodes)
        return ConditionerOutput(context=torch.cat([o.context for o in outs])[:num],
                                 context_mask=torch.cat([o.context_mask for o in outs])[:num],
                                 pooled=torch.cat([o.pooled for o in outs])[:num])

    @property
    def micro_batch_size(self) -> int:
        return int(self.config["micro_batch_size"])

    def set_micro_batch_size(self, size: int) -> None:
        """Images per network call (the conditioner, UNet, aligner and VAE always see exactly this many rows).

        Fixed shapes are what make an image independent of its batch: CPU and
        GPU kernels pick their blocking by batch size, and a 1e-6 change in a
        noise prediction at the first step (where gamma_t is small) grows into visible
        pixels. A short last chunk is padded with copies whose outputs are
        dropped. Images are byte-identical between calls with the same size;
        raise it on a GPU (e.g. 32), keep it small on a CPU, where a padded
        row costs as much as a real one. Saved in ``model_index.json``.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"micro_batch_size: {size!r} must be an integer >= 1")
        self.register_to_config(micro_batch_size=size)

    def prepare_latents(self, num: int, generator: torch.Generator | list[torch.Generator] | None,
                        latents: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Initial noise (N, C, h, w), drawn image by image from each image's generator."""
        shape = (num, *self.latent_shape)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: shape {tuple(latents.shape)} must be {shape}")
            return latents.to(self.device, dtype)
        gens = _per_image(generator, num)
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device if g is not None else "cpu",
                             dtype=dtype) for g in gens]
        return torch.cat(draws).to(self.device)

    def predict_noise(self, x_in: Tensor, t: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """eps_hat = f_theta(X_t, t, context) (N, C, h, w); the masked mean of the context enters the
        timestep embedding when the UNet has the pooled-condition embedding."""
        m = mask.to(x_in.dtype)
        pooled = pool_context(context, m) if self.unet.class_embedding is not None else None
        tt = t.reshape(-1).expand(x_in.shape[0]) if t.numel() == 1 else t
        return self.unet(x_in, tt, encoder_hidden_states=context, encoder_attention_mask=m,
                         class_labels=pooled).sample

    def decode_latents(self, z: Tensor) -> Tensor:
        """Latents -> images in [-1, 1], (N, 3, H, W) float32."""
        return decode(self.vae, z).float()

    def denoise_step(self, ch: "_Chunk", t: Tensor, cfg_scale: float, w: float, cond_fn: CondFn | None,
                     pass_generator: bool) -> Tensor:
        """One step of Algorithm 1 on a chunk of exactly ``micro_batch_size`` images: X_t -> X_{t-1}."""
        x_in = ch.sched.scale_model_input(ch.x, t)  # the variance-preserving X_t for every supported scheduler
        if cfg_scale != 1.0:  # one UNet pass for the conditional and the null rows
            null_ctx, null_mask = self.conditioner.null_condition(len(x_in), ch.ctx.shape[1])
            eps_c, eps_u = self.predict_noise(torch.cat([x_in, x_in]), t, torch.cat([ch.ctx, null_ctx.to(ch.ctx.dtype)]),
                                              torch.cat([ch.mask, null_mask])).chunk(2)
            eps = eps_u + cfg_scale * (eps_c - eps_u)
        else:
            eps = self.predict_noise(x_in, t, ch.ctx, ch.mask)
        if cond_fn is not None:  # eq. 8, on the noise prediction
            tt = t.reshape(-1).expand(len(x_in)).to(self.device)
            grad = cond_fn(x_in.to(self.aligner.dtype), tt, ch.c.to(self.aligner.dtype))  # (M, C, h, w)
            alpha_bar = current_alpha_bar(ch.sched, t, ch.sched.alphas_cumprod.to(self.device))
            eps = condition_score(eps, grad.to(eps.dtype), alpha_bar, w)
        kw = {"generator": ch.gens} if pass_generator else {}
        return ch.sched.step(eps, t, ch.x, **kw).prev_sample

    # -- the call ------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        barcode: str | list[str],
        latitude: float | None | Sequence[float | None] = None,
        longitude: float | None | Sequence[float | None] = None,
        num_images_per_barcode: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        aligner_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> G2PDiffusionPipelineOutput | tuple:
        """Images for each barcode and place (Algorithm 1).

        Notation: B barcodes, n = ``num_images_per_barcode``, N = B n; s =
        ``guidance_scale`` (CFG, 1 = off), w = ``aligner_guidance_scale`` (0 =
        off), gamma_t = alphas_cumprod at t.

        1. check every input (``ValueError`` naming field and value)
        2. condition: context, mask and pooled c of each barcode, repeated n times
        3. noise X_T per image from its generator
        4. per step: eps = eps_u + s (eps_c - eps_u) in one UNet pass;
           if w != 0: eps -= sqrt(1 - gamma_t) w grad log p_phi(c | X_t)  (eq. 8);
           X_{t-1} = scheduler.step(eps, t, X_t)
        5. decode with the VAE

        ``None`` knobs take the model's saved sampling defaults; a place of
        ``None`` is the unknown-place token. With w = 0 the aligner never runs,
        so the result is bit for bit unguided sampling.
        """
        s = self.cfg.sampling
        steps = s.steps if num_inference_steps is None else num_inference_steps
        cfg_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        w = s.aligner_guidance_scale if aligner_guidance_scale is None else aligner_guidance_scale
        n = num_images_per_barcode
        # 1. inputs
        seqs, places = self.check_inputs(barcode, latitude, longitude, n, steps, cfg_scale, w, output_type)
        num = len(seqs) * n
        if isinstance(generator, list) and len(generator) != num:
            raise ValueError(f"generator: a list of {len(generator)} generators for {num} images "
                             f"({len(seqs)} barcodes x {n}); give one per image")
        # 2. condition, one row per image
        cond = self.encode_condition(seqs, places)
        dtype = self.unet.dtype
        ctx = cond.context.to(dtype).repeat_interleave(n, dim=0)  # (N, L, d)
        mask = cond.context_mask.bool().repeat_interleave(n, dim=0)  # (N, L)
        c = cond.pooled.repeat_interleave(n, dim=0)  # (N, d)
        cond_fn = self.aligner.cond_fn() if w != 0 else None
        # 3. noise, image by image; a fresh scheduler per chunk (concurrent calls never share its state)
        gens = _per_image(generator, num)
        x = self.prepare_latents(num, generator, latents, dtype)  # (N, C, h, w)
        m = self.micro_batch_size
        spare = [torch.Generator().manual_seed(0) for _ in range(m)]  # padded rows never draw from the user's
        chunks = []
        for i in range(0, num, m):
            sched = self.scheduler.__class__.from_config(self.scheduler.config)
            sched.set_timesteps(steps, device=self.device)
            k = min(m, num - i)
            rows = [_pad_rows(v[i:i + m], m) for v in (x, ctx, mask, c)]
            chunks.append(_Chunk(sched, rows[0] * sched.init_noise_sigma, *rows[1:], gens[i:i + k] + spare[k:], k))
        step_kw = "generator" in inspect.signature(chunks[0].sched.step).parameters
        # 4. the reverse process, all chunks in lockstep, so each generator is drawn in image order per step
        for j, t in enumerate(self.progress_bar(chunks[0].sched.timesteps)):
            for ch in chunks:
                ch.x = self.denoise_step(ch, ch.sched.timesteps[j], cfg_scale, w, cond_fn, step_kw)
        x = torch.cat([ch.x[:ch.real] for ch in chunks])  # (N, C, h, w)
        # 5. decode
        if output_type == "latent":
            images: Any = x
        else:
            pixels = torch.cat([self.decode_latents(z.to(self.vae.dtype)) for (z,) in _fixed_chunks([x], m)])[:num]
            images = to_output(pixels, output_type)  # (N, 3, H, W) in [-1, 1] -> the output type
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return G2PDiffusionPipelineOutput(images=images)

    # -- from and to the training model ---------------------------------------------
    @classmethod
    def from_model(cls, model: Any, scheduler: str | None = None) -> "G2PDiffusionPipeline":
        """The pipeline of a :class:`~g2p.model.G2PDiffusion` (weights copied, LoRA fused into the UNet)."""
        import copy

        from g2p.models.vae import latent_size

        cfg: G2PConfig = model.cfg
        cond = ConditionerModel(conditioner_config=_to_plain(cfg.conditioner), vocab_size=model.conditioner.vocab_size)
        cond.conditioner.load_state_dict(model.conditioner.state_dict())
        cond.null_context.data.copy_(model.denoiser.null_context.detach())
        unet = copy.deepcopy(model.denoiser.unet)
        if getattr(model, "has_lora", False):
            unet.fuse_lora(lora_scale=1.0)
            unet.unload_lora()
        bank = model.negative_bank.detach().float()
        aligner = AlignerModel(aligner_config=_to_plain(cfg.aligner), latent_channels=cfg.vae.latent_channels,
                               latent_size=latent_size(cfg.vae), embed_dim=cfg.conditioner.hidden_size,
                               num_negatives=int(bank.shape[0]))
        aligner.aligner.load_state_dict(model.aligner.state_dict())
        aligner.negative_bank.copy_(bank.to(aligner.negative_bank.device))
        vae = copy.deepcopy(model.vae)
        sched = build_scheduler(cfg.diffusion, scheduler or cfg.sampling.scheduler)
        if scheduler:
            cfg = cfg.set("sampling.scheduler", scheduler)
        pipe = cls(tokenizer=copy.deepcopy(model.tokenizer), conditioner=cond, vae=vae, unet=unet, aligner=aligner,
                   scheduler=sched, g2p_config=cfg.to_dict())
        for part in (cond, vae, unet, aligner):
            part.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(model.device) if hasattr(model, "device") else pipe

    def with_scheduler(self, name: str) -> "G2PDiffusionPipeline":
        """A pipeline sharing this one's modules (no weights copied) with the scheduler named ``name``
        (a ``sampling.scheduler`` name); this pipeline is unchanged, so callers on other threads are safe."""
        parts = {k: v for k, v in self.components.items() if k != "scheduler"}
        other = type(self)(**parts, scheduler=build_scheduler(self.cfg.diffusion, name),
                           g2p_config=self.cfg.set("sampling.scheduler", name).to_dict(),
                           micro_batch_size=self.micro_batch_size)
        other.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return other


def load_pipeline(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  progress: bool = False) -> G2PDiffusionPipeline:
    """A pipeline folder (``model_index.json``), or a folder of the training layout converted in memory."""
    from pathlib import Path

    src = Path(path)
    if (src / "model_index.json").exists():
        pipe = G2PDiffusionPipeline.from_pretrained(str(src), local_files_only=True)
    elif (src / "denoiser.safetensors").exists():
        from g2p.model import G2PDiffusion

        pipe = G2PDiffusionPipeline.from_model(G2PDiffusion.from_pretrained(src))
    else:
        raise FileNotFoundError(f"{src}: neither a G2PDiffusionPipeline folder (model_index.json) nor a "
                                f"G2PDiffusion checkpoint (denoiser.safetensors)")
    pipe.set_progress_bar_config(disable=not progress)
    pipe = pipe.to(device)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe


def saved_config(path: str) -> G2PConfig:
    """A model folder's :class:`G2PConfig` (either layout) without loading its weights."""
    import json
    from pathlib import Path

    src = Path(path)
    if (src / "model_index.json").exists():
        return G2PConfig.from_dict(json.loads((src / "model_index.json").read_text()).get("g2p_config") or {})
    if (src / "denoiser.safetensors").exists():
        from g2p.train.checkpoint import config_from_checkpoint

        return config_from_checkpoint(src / "denoiser.safetensors")
    raise FileNotFoundError(f"{src}: neither a G2PDiffusionPipeline folder (model_index.json) nor a "
                            f"G2PDiffusion checkpoint (denoiser.safetensors)")


def convert_checkpoint(old: str, new: str) -> str:
    """``g2p convert-checkpoint``: a folder of the training layout -> the pipeline layout at ``new``."""
    from pathlib import Path

    from g2p.model import G2PDiffusion

    if not (Path(old) / "denoiser.safetensors").exists():
        raise FileNotFoundError(f"{old}: not a G2PDiffusion checkpoint (no denoiser.safetensors)")
    G2PDiffusionPipeline.from_model(G2PDiffusion.from_pretrained(old)).save_pretrained(new)
    return new


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def to_output(pixels: Tensor, output_type: str) -> Any:
    """Images in [-1, 1] (N, 3, H, W), rounded to the uint8 a PNG holds, as PIL images, a float array
    (N, H, W, 3) in [0, 1] (``np``) or a float tensor (N, 3, H, W) in [0, 1] (``pt``)."""
    u8 = to_uint8(pixels).cpu()  # (N, 3, H, W)
    if output_type == "pt":
        return u8.float() / 255.0
    arr = u8.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    if output_type == "np":
        return arr.astype(np.float32) / 255.0
    return [PIL.Image.fromarray(a) for a in arr]


def images_uint8(images: Any) -> Tensor:
    """A pipeline output's images (``pil``, ``np`` or ``pt``) as uint8 (N, 3, H, W): exactly the rounded pixels."""
    if isinstance(images, Tensor):
        return (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    if isinstance(images, np.ndarray):
        return torch.from_numpy((images * 255).round().clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2)
    return torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images])


@dataclass
class _Chunk:
    """One fixed-size chunk of a call's images and its own scheduler (multistep solvers keep history)."""

    sched: SchedulerMixin
    x: Tensor  # (M, C, h, w)
    ctx: Tensor  # (M, L, d)
    mask: Tensor  # (M, L)
    c: Tensor  # (M, d)
    gens: list[torch.Generator]
    real: int  # the first ``real`` rows are images; the rest pad the chunk to M


def _pad_rows(v: Tensor, size: int) -> Tensor:
    """Rows of ``v`` padded to ``size`` with copies of its last row."""
    if len(v) == size:
        return v
    return torch.cat([v, v[-1:].expand(size - len(v), *v.shape[1:])])


def _fixed_chunks(tensors: list[Tensor], size: int) -> list[list[Tensor]]:
    """The rows of ``tensors`` in chunks of exactly ``size`` rows (the last one padded)."""
    num = len(tensors[0])
    return [[_pad_rows(v[i:i + size], size) for v in tensors] for i in range(0, num, size)]


def _per_barcode(v: Any, num: int, name: str) -> list[float | None]:
    if v is None or isinstance(v, (int, float)) and not isinstance(v, bool):
        return [v] * num
    if isinstance(v, (Tensor, np.ndarray)):
        v = v.tolist()
    if not isinstance(v, Sequence) or isinstance(v, str):
        raise ValueError(f"{name}: {v!r} must be a number, None or a list with one per barcode")
    if len(v) != num:
        raise ValueError(f"{name}: {len(v)} values for {num} barcodes (lengths differ)")
    return list(v)


def _per_image(generator: Any, num: int) -> list[torch.Generator | None]:
    """One generator per image: a list as given, or the one generator for every image in turn."""
    if isinstance(generator, list):
        return generator
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    return [generator] * num


# ----------------------------------------------------------------------------
# many barcodes, seeded image by image
# ----------------------------------------------------------------------------


def image_seed(seed: int, barcode_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of barcode ``barcode_index`` in a seeded batch job."""
    return int(np.random.SeedSequence([int(seed), int(barcode_index), int(image_index)]).generate_state(1)[0])


def generate_uint8(pipe: G2PDiffusionPipeline, barcodes: Sequence[str], latitudes: Sequence[float | None],
                   longitudes: Sequence[float | None], num_images: int = 1, seed: int = 0,
                   batch_images: int = 64, on_images: Any = None, seed_index: Sequence[int] | None = None,
                   **knobs: Any) -> Tensor:
    """uint8 (B, n, 3, H, W): ``num_images`` images per barcode, in pipeline calls of about ``batch_images``.

    Image j of barcode i comes from its own generator seeded ``image_seed(seed,
    seed_index[i], j)`` (``seed_index`` defaults to 0..B-1), so it is the same
    whatever the batch size and whichever row or variant it is made for: two
    calls with the same seeds are paired sample for sample. ``on_images(k)``
    is called after each call with the number of images made (progress).
    """
    if len(barcodes) != len(latitudes) or len(barcodes) != len(longitudes):
        raise ValueError(f"barcodes, latitudes, longitudes: lengths differ "
                         f"({len(barcodes)}, {len(latitudes)}, {len(longitudes)})")
    index = list(range(len(barcodes))) if seed_index is None else list(seed_index)
    per = max(1, batch_images // num_images)
    out = []
    for i in range(0, len(barcodes), per):
        sl = slice(i, i + per)
        gens = [torch.Generator().manual_seed(image_seed(seed, k, j)) for k in index[sl] for j in range(num_images)]
        imgs = pipe(list(barcodes[sl]), list(latitudes[sl]), list(longitudes[sl]), num_images_per_barcode=num_images,
                    generator=gens, output_type="pt", **knobs).images
        u8 = images_uint8(imgs)
        out.append(u8.view(-1, num_images, *u8.shape[1:]))
        if on_images is not None:
            on_images(len(gens))
    return torch.cat(out)
