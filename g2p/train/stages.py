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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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


def _index_batches(n: int, cfg: TrainConfig, shard: Shard) -> Iterator[np.ndarray]:
    per_rank = max(1, cfg.batch_size // shard.world_size)  # global batch = cfg.batch_size
    return cycle(lambda epoch: epoch_batches(n, per_rank, cfg.seed, epoch, shard.rank, shard.world_size))


def _generator(cfg: TrainConfig, shard: Shard) -> torch.Generator:
    """Noise and masking randomness, distinct per rank, fixed per seed."""
    return torch.Generator().manual_seed(cfg.seed * 1009 + shard.rank)


def _skip(batches: Iterator, resume: dict | None) -> Iterator:
    """On resumption, advance the data stream past the batches already trained on."""
    for _ in range(int(resume["step"]) if resume else 0):
        next(batches)
    return batches


def pretrain_conditioner(model: G2PDiffusion, data: Arrays, cfg: TrainConfig, *, shard: Shard = Shard(),
                         hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
                         until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """BarcodeBERT-style masked-language-model pretraining of the conditioner."""
    g = _generator(cfg, shard)
    batches = _skip(_index_batches(len(data), cfg, shard), resume)
    objective = wrap(MLMObjective(model.conditioner))
    dev = model.device

    def step(idx: np.ndarray, _: int) -> dict:
        b = data.subset(idx)
        ids, mask = model.tokenize(b.barcode)
        loss = objective(ids, mask, b.lat.to(dev), b.lon.to(dev), b.has_place.to(dev), generator=g)
        return {"loss": loss, "batch_size": len(idx)}

    params = list(model.conditioner.parameters())
    return fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
               desc="pretrain_conditioner", until=until)


def train_vae(model: G2PDiffusion, data: Arrays, cfg: TrainConfig, *, shard: Shard = Shard(),
              hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
              until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Train the VAE on images alone; afterwards measure the latent scale (as SD's 0.18215)."""
    assert data.images is not None, "train_vae needs images"
    g = _generator(cfg, shard)
    batches = _skip(_index_batches(len(data), cfg, shard), resume)
    model.vae.train()
    objective = wrap(VAEObjective(model.vae, model.cfg.vae))

    def step(idx: np.ndarray, _: int) -> dict:
        x = to_unit_range(data.images[torch.as_tensor(idx)]).to(model.device)  # (B, 3, S, S)
        out = objective(x, generator=g)
        return {**out, "batch_size": len(idx)}

    state = fit(step, list(model.vae.parameters()), batches, cfg, hooks=hooks, resume=resume,
                progress=progress, desc="train_vae", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    model.vae.eval()
    if state.step >= cfg.steps:
        n = min(len(data), 256)
        with torch.no_grad():
            x = to_unit_range(data.images[:n]).to(model.device)
            model.set_vae_scaling_factor(1.0)
            model.set_vae_scaling_factor(estimate_scaling_factor(model.vae, x))
    return state


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


def train_base(model: G2PDiffusion, latents: Tensor, cfg: TrainConfig, *, shard: Shard = Shard(),
               hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
               until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Our own "pretrained Stable Diffusion": the UNet learns images alone (null condition)."""
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    batches = _skip(_index_batches(len(latents), cfg, shard), resume)
    den = model.denoiser
    den.train()
    objective = wrap(BaseObjective(den, sched, model.cfg.diffusion))

    def step(idx: np.ndarray, _: int) -> dict:
        z0 = latents[torch.as_tensor(idx)].to(model.device)
        return {"loss": objective(z0, generator=g), "batch_size": len(idx)}

    params = list(den.unet.parameters())  # the null context is learned with the condition, later
    state = fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_base", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    return state


def train_diffusion(model: G2PDiffusion, data: Arrays, latents: Tensor, cfg: TrainConfig, *,
                    shard: Shard = Shard(), hooks: Hooks | None = None, resume: dict | None = None,
                    progress: bool = True, until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """LoRA on the UNet plus the conditioner (and the null context), eq. 6 with condition dropout."""
    model.add_lora()
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    batches = _skip(_index_batches(len(data), cfg, shard), resume)
    model.denoiser.train()
    model.conditioner.train()
    objective = wrap(ConditionalObjective(model.conditioner, model.denoiser, sched, model.cfg.diffusion))
    dev = model.device

    def step(idx: np.ndarray, _: int) -> dict:
        b = data.subset(idx)
        z0 = latents[torch.as_tensor(idx)].to(dev)
        ids, mask = model.tokenize(b.barcode)
        loss = objective(ids, mask, b.lat.to(dev), b.lon.to(dev), b.has_place.to(dev), z0, generator=g)
        return {"loss": loss, "batch_size": len(idx)}

    params = ([p for p in model.denoiser.parameters() if p.requires_grad]
              + list(model.conditioner.parameters()))
    state = fit(step, params, batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_diffusion", until=until)
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


def train_aligner(model: G2PDiffusion, data: Arrays, latents: Tensor, cfg: TrainConfig, *,
                  shard: Shard = Shard(), hooks: Hooks | None = None, resume: dict | None = None,
                  progress: bool = True, until: int | None = None, bank_size: int | None = None,
                  wrap: Wrap = _identity) -> FitState:
    """The dynamic aligner: InfoNCE of g_phi(X_t, t) against c at random t; fills the negative bank."""
    g = _generator(cfg, shard)
    sched = build_train_scheduler(model.cfg.diffusion)
    c_all = pooled_conditions(model, data)  # (N, d): the conditioner is fixed from here on
    batches = _skip(_index_batches(len(data), cfg, shard), resume)
    model.aligner.train()
    objective = wrap(AlignerObjective(model.aligner, sched))

    def step(idx: np.ndarray, _: int) -> dict:
        t_idx = torch.as_tensor(idx)
        loss = objective(latents[t_idx].to(model.device), c_all[t_idx].to(model.device), generator=g)
        return {"loss": loss, "temperature": 1.0 / model.aligner.logit_scale.detach(), "batch_size": len(idx)}

    state = fit(step, list(model.aligner.parameters()), batches, cfg, hooks=hooks, resume=resume,
                progress=progress, desc="train_aligner", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    model.aligner.eval()
    size = model.cfg.sampling.negative_bank_size if bank_size is None else bank_size
    model.negative_bank = sample_negative_bank(c_all, size, torch.Generator().manual_seed(cfg.seed))
    return state

