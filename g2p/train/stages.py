"""The training stages of G2PDiffusion, each one call of :func:`g2p.train.loop.fit`.

The two-step shape is the paper's: a Stable Diffusion base (VAE and UNet,
trained here on images alone when no pretrained folder is given), then LoRA on
the UNet trained jointly with the DNA conditioner, then the aligner on noisy
latents. Each stage is an importable function that a unit test, a Ray Train
worker and a GPU script call alike; ``rank``/``world_size`` shard the data and
``hooks`` let tracking and checkpointing in.

Each stage computes its loss through one small *objective* module (the
trained components and nothing else, the loss as its ``forward``). ``wrap``
is applied to it once: data-parallel training passes a wrapper such as DDP
(which only synchronises gradients of computations that run through its
``forward``), a GPU run may add autocast. The default is the identity, and
the stage then computes exactly what it did without the seam.

    pretrain_conditioner  MLM on barcodes (the unlabelled pretrain split too)
    train_vae             foreground-weighted reconstruction + KL
    train_base            UNet epsilon loss (eq. 6) with the null condition only
    train_diffusion       LoRA + conditioner, eq. 6 with condition dropout
    train_aligner         InfoNCE (eq. 9) of noisy latents against pooled c
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from g2p.config import DiffusionConfig, TrainConfig, VAEConfig
from g2p.data.dataset import Arrays, epoch_batches, to_unit_range
from g2p.diffusion.guidance import sample_negative_bank
from g2p.diffusion.losses import diffusion_loss
from g2p.diffusion.schedule import build_train_scheduler
from g2p.model import G2PDiffusion
from g2p.models.aligner import Aligner, aligner_loss
from g2p.models.conditioner import Conditioner
from g2p.models.unet import Denoiser
from g2p.models.vae import encode, estimate_scaling_factor, vae_loss
from g2p.train.loop import FitState, Hooks, cycle, fit

Wrap = Callable[[nn.Module], nn.Module]
VAE_SCALE_SAMPLE = 256  # images the latent scale is measured on after train_vae


@dataclass(frozen=True)
class Shard:
    """Which slice of the data this process trains on (data parallelism)."""

    rank: int = 0
    world_size: int = 1


def _identity(module: nn.Module) -> nn.Module:
    return module


# ----------------------------------------------------------------------------
# objectives: the trained components with the loss as forward (see module doc)
# ----------------------------------------------------------------------------


class MLMObjective(nn.Module):
    """Masked k-mer prediction of the conditioner."""

    def __init__(self, conditioner: Conditioner) -> None:
        super().__init__()
        self.conditioner = conditioner

    def forward(self, ids: Tensor, mask: Tensor, lat: Tensor, lon: Tensor, has_place: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return self.conditioner.mlm_loss(ids, mask, lat, lon, has_place, generator=generator)


class VAEObjective(nn.Module):
    """Foreground-weighted reconstruction + KL of the VAE."""

    def __init__(self, vae: nn.Module, cfg: VAEConfig) -> None:
        super().__init__()
        self.vae, self.cfg = vae, cfg

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return vae_loss(self.vae, x, self.cfg, generator=generator)


class BaseObjective(nn.Module):
    """Eq. 6 with the null condition only (the image prior of ``train_base``)."""

    def __init__(self, denoiser: Denoiser, scheduler: SchedulerMixin, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.denoiser, self.scheduler, self.cfg = denoiser, scheduler, replace(cfg, condition_dropout=0.0)

    def forward(self, z0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ctx, mask = self.denoiser.null_condition(len(z0), 1)  # (B, 1, d), (B, 1)
        return diffusion_loss(self.denoiser, z0, ctx, mask, self.scheduler, self.cfg, generator=generator)


class ConditionalObjective(nn.Module):
    """Eq. 6 through the conditioner and the (LoRA) denoiser, with condition dropout."""

    def __init__(self, conditioner: Conditioner, denoiser: Denoiser, scheduler: SchedulerMixin,
                 cfg: DiffusionConfig) -> None:
        super().__init__()
        self.conditioner, self.denoiser, self.scheduler, self.cfg = conditioner, denoiser, scheduler, cfg

    def forward(self, ids: Tensor, mask: Tensor, lat: Tensor, lon: Tensor, has_place: Tensor, z0: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        cond = self.conditioner(ids, mask, lat, lon, has_place)
        return diffusion_loss(self.denoiser, z0, cond.context, cond.context_mask, self.scheduler, self.cfg,
                              generator=generator)


class AlignerObjective(nn.Module):
    """Eq. 9: InfoNCE of the aligner on noisy latents against fixed pooled conditions."""

    def __init__(self, aligner: Aligner, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.aligner, self.scheduler = aligner, scheduler

    def forward(self, z0: Tensor, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return aligner_loss(self.aligner, z0, c, self.scheduler, generator=generator)


# ----------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------


Batch = dict[str, Any]  # "barcode" list[str], "lat"/"lon" (B,), "has_place" (B,), "image" or "latent"
Data = Arrays | Iterable[Batch]


def per_rank_batch_size(cfg: TrainConfig, shard: Shard) -> int:
    """Rows per step on one rank: the global batch ``cfg.batch_size`` split over the ranks."""
    return max(1, cfg.batch_size // shard.world_size)


def array_batches(data: Arrays, cfg: TrainConfig, shard: Shard = Shard(), *, latents: Tensor | None = None,
                  start_step: int = 0) -> Iterator[Batch]:
    """Endless batches of in-memory :class:`Arrays` (per-epoch seeded shuffles, sharded by rank).

    ``start_step`` skips the batches a resumed run has already trained on, so
    a resumed in-memory run sees exactly the batches it would have seen.
    """
    per_rank = per_rank_batch_size(cfg, shard)
    idx = cycle(lambda epoch: epoch_batches(len(data), per_rank, cfg.seed, epoch, shard.rank, shard.world_size))
    for _ in range(start_step):
        next(idx)
    for i in idx:
        b = data.subset(i)
        out: Batch = {"barcode": b.barcode, "lat": b.lat, "lon": b.lon, "has_place": b.has_place}
        if b.images is not None:
            out["image"] = b.images
        if latents is not None:
            out["latent"] = latents[torch.as_tensor(i)]
        yield out


def _batches(data: Data, cfg: TrainConfig, shard: Shard, resume: dict | None,
             latents: Tensor | None = None, need: str | None = None) -> Iterator[Batch]:
    """The stage's batch stream: in-memory arrays (deterministic, resumable) or a given iterable.

    A streamed source (Ray Data in the training driver) is used as it comes:
    it shuffles itself, and after a restart it continues with fresh batches
    rather than replaying the ones before the checkpoint.
    """
    if isinstance(data, Arrays):
        if need == "latent" and latents is None:
            raise ValueError("latents: this stage trains on latents; pass latents= with in-memory Arrays")
        if need == "image" and data.images is None:
            raise ValueError("images: this stage trains on images; the Arrays have none")
        return array_batches(data, cfg, shard, latents=latents, start_step=int(resume["step"]) if resume else 0)
    it = iter(data)
    if need is None:
        return it
    return _require(it, need)


def _require(it: Iterator[Batch], key: str) -> Iterator[Batch]:
    for b in it:
        if key not in b:
            raise ValueError(f"{key}: the batches lack the column {key!r} this stage trains on (have {sorted(b)})")
        yield b


def _generator(cfg: TrainConfig, shard: Shard) -> torch.Generator:
    """Noise and masking randomness, distinct per rank, fixed per seed."""
    return torch.Generator().manual_seed(cfg.seed * 1009 + shard.rank)


def _places(b: Batch, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return b["lat"].to(dev), b["lon"].to(dev), b["has_place"].to(dev)


def pretrain_conditioner(model: G2PDiffusion, data: Data, cfg: TrainConfig, *, shard: Shard = Shard(),
                         hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
                         until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """BarcodeBERT-style masked-language-model pretraining of the conditioner."""
    g = _generator(cfg, shard)
    batches = _batches(data, cfg, shard, resume)
    objective = wrap(MLMObjective(model.conditioner))
    dev = model.device

    def step(b: Batch, _: int) -> dict:
        ids, mask = model.tokenize(b["barcode"])
        loss = objective(ids, mask, *_places(b, dev), generator=g)
        return {"loss": loss, "batch_size": len(b["barcode"])}

    params = list(model.conditioner.parameters())
    return fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
               desc="pretrain_conditioner", until=until)


def train_vae(model: G2PDiffusion, data: Data, cfg: TrainConfig, *, shard: Shard = Shard(),
              hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
              until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Train the VAE on images alone; afterwards measure the latent scale (as SD's 0.18215)."""
    g = _generator(cfg, shard)
    batches = _batches(data, cfg, shard, resume, need="image")
    model.vae.train()
    objective = wrap(VAEObjective(model.vae, model.cfg.vae))

    def step(b: Batch, _: int) -> dict:
        x = to_unit_range(b["image"]).to(model.device)  # (B, 3, S, S)
        out = objective(x, generator=g)
        return {**out, "batch_size": len(x)}

    state = fit(step, list(model.vae.parameters()), batches, cfg, hooks=hooks, resume=resume,
                progress=progress, desc="train_vae", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    model.vae.eval()
    if state.step >= cfg.steps:
        if isinstance(data, Arrays):  # the first 256 records, as before streaming
            images = data.images[:VAE_SCALE_SAMPLE]
        else:  # the next batches of the stream: a random sample of the training images
            images = _take(batches, "image", VAE_SCALE_SAMPLE)
        with torch.no_grad():
            x = to_unit_range(images).to(model.device)
            model.set_vae_scaling_factor(1.0)
            model.set_vae_scaling_factor(estimate_scaling_factor(model.vae, x))
    return state


def _take(batches: Iterator[Batch], key: str, n: int) -> Tensor:
    """At least min(n, one epoch) rows of column ``key`` from the stream, as one tensor."""
    got: list[Tensor] = []
    while sum(len(t) for t in got) < n:
        got.append(next(batches)[key])
    return torch.cat(got)[:n]


@torch.no_grad()
def encode_latents(model: G2PDiffusion, images: Tensor, batch_size: int = 64, progress: bool = False) -> Tensor:
    """uint8 images (N, 3, S, S) -> cached diffusion latents (N, C, h, w), posterior means."""
    model.vae.eval()
    chunks = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="encode latents", unit="batch", mininterval=2.0)
    out = [encode(model.vae, to_unit_range(images[i:i + batch_size]).to(model.device)).cpu() for i in chunks]
    return torch.cat(out) if out else torch.zeros(0, *model.latent_shape)


def train_base(model: G2PDiffusion, data: Data, cfg: TrainConfig, *, latents: Tensor | None = None,
               shard: Shard = Shard(), hooks: Hooks | None = None, resume: dict | None = None,
               progress: bool = True, until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Our own "pretrained Stable Diffusion": the UNet learns images alone (null condition)."""
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    batches = _batches(data, cfg, shard, resume, latents, need="latent")
    den = model.denoiser
    den.train()
    objective = wrap(BaseObjective(den, sched, model.cfg.diffusion))

    def step(b: Batch, _: int) -> dict:
        z0 = b["latent"].to(model.device)
        return {"loss": objective(z0, generator=g), "batch_size": len(z0)}

    params = list(den.unet.parameters())  # the null context is learned with the condition, later
    state = fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_base", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    return state


def train_diffusion(model: G2PDiffusion, data: Data, cfg: TrainConfig, *, latents: Tensor | None = None,
                    shard: Shard = Shard(), hooks: Hooks | None = None, resume: dict | None = None,
                    progress: bool = True, until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """LoRA on the UNet plus the conditioner (and the null context), eq. 6 with condition dropout.

    With ``lora.train_conditioner`` off the conditioner stays as it came in.
    """
    model.add_lora()
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    batches = _batches(data, cfg, shard, resume, latents, need="latent")
    train_conditioner = model.cfg.lora.train_conditioner
    frozen = [] if train_conditioner else [p for p in model.conditioner.parameters() if p.requires_grad]
    for p in frozen:  # lora.train_conditioner off: no gradient through the conditioner, no optimiser state
        p.requires_grad_(False)
    model.denoiser.train()
    model.conditioner.train(train_conditioner)
    objective = wrap(ConditionalObjective(model.conditioner, model.denoiser, sched, model.cfg.diffusion))
    dev = model.device

    def step(b: Batch, _: int) -> dict:
        z0 = b["latent"].to(dev)
        ids, mask = model.tokenize(b["barcode"])
        loss = objective(ids, mask, *_places(b, dev), z0, generator=g)
        return {"loss": loss, "batch_size": len(z0)}

    params = ([p for p in model.denoiser.parameters() if p.requires_grad]
              + (list(model.conditioner.parameters()) if train_conditioner else []))
    state = fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_diffusion", until=until)
    for p in frozen:
        p.requires_grad_(True)
    if state.ema is not None:
        state.ema.copy_to_params()
    model.denoiser.eval()
    model.conditioner.eval()
    return state


@torch.no_grad()
def eval_diffusion_loss(model: G2PDiffusion, data: Arrays, latents: Tensor, *, seed: int = 0,
                        num_timesteps: int = 8, batch_size: int = 64) -> float:
    """Eq. 6 on fixed noise at evenly spread timesteps: a low-variance validation loss.

    Training losses jump with the random t of each batch; this one compares
    checkpoints (and shows whether the condition is used) on equal terms.
    """
    from g2p.diffusion.schedule import add_noise

    sched = build_train_scheduler(model.cfg.diffusion)
    T = sched.config.num_train_timesteps
    ts = torch.linspace(T * 0.05, T * 0.95, num_timesteps).long()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(data), batch_size):
        idx = np.arange(i, min(i + batch_size, len(data)))
        b = data.subset(idx)
        cond = model.condition(b.barcode, b.lat, b.lon, b.has_place)
        z0 = latents[torch.as_tensor(idx)].to(model.device)
        for t in ts:
            eps = torch.randn(z0.shape, generator=g).to(z0)
            tt = t.expand(len(idx)).to(model.device)
            eps_hat = model.denoiser(add_noise(sched, z0, eps, tt), tt, cond.context, cond.context_mask)
            total += float(((eps_hat - eps) ** 2).mean()) * len(idx)
            count += len(idx)
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def pooled_conditions(model: G2PDiffusion, data: Arrays, batch_size: int = 256) -> Tensor:
    """c (N, d) for every record, with the (trained, frozen) conditioner."""
    model.conditioner.eval()
    out = []
    for i in range(0, len(data), batch_size):
        b = data.subset(np.arange(i, min(i + batch_size, len(data))))
        out.append(model.condition(b.barcode, b.lat, b.lon, b.has_place).pooled.cpu())
    return torch.cat(out)


def train_aligner(model: G2PDiffusion, data: Data, cfg: TrainConfig, *, latents: Tensor | None = None,
                  shard: Shard = Shard(), hooks: Hooks | None = None, resume: dict | None = None,
                  progress: bool = True, until: int | None = None, bank_size: int | None = None,
                  wrap: Wrap = _identity) -> FitState:
    """The dynamic aligner: InfoNCE of g_phi(X_t, t) against c at random t; fills the negative bank.

    The conditioner is fixed from here on: c of each batch is computed without
    gradient as the batch comes (no pass over the whole data set first).
    """
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    batches = _batches(data, cfg, shard, resume, latents, need="latent")
    model.conditioner.eval()
    model.aligner.train()
    objective = wrap(AlignerObjective(model.aligner, sched))

    @torch.no_grad()
    def pooled(b: Batch) -> Tensor:
        return model.condition(b["barcode"], b["lat"], b["lon"], b["has_place"]).pooled

    def step(b: Batch, _: int) -> dict:
        loss = objective(b["latent"].to(model.device), pooled(b), generator=g)
        return {"loss": loss, "temperature": 1.0 / model.aligner.logit_scale.detach(), "batch_size": len(b["latent"])}

    state = fit(step, list(model.aligner.parameters()), batches, cfg, hooks=hooks, resume=resume,
                progress=progress, desc="train_aligner", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    model.aligner.eval()
    size = model.cfg.sampling.negative_bank_size if bank_size is None else bank_size
    if isinstance(data, Arrays):  # every record's c, as before streaming
        pool = pooled_conditions(model, data)
    else:  # rows of the (shuffled) stream: a random sample of the training conditions
        pool = torch.cat([pooled(b).cpu() for b in _head(batches, size)]) if size > 0 else torch.zeros(0)
    model.negative_bank = sample_negative_bank(pool, size, torch.Generator().manual_seed(cfg.seed))
    return state


def _head(batches: Iterator[Batch], n: int) -> Iterator[Batch]:
    """Batches of the stream until they hold at least ``n`` rows."""
    seen = 0
    while seen < n:
        b = next(batches)
        seen += len(b["barcode"])
        yield b
