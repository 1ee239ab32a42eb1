"""The noise schedule (paper eqs. 3-5) on diffusers' schedulers.

One :class:`DiffusionConfig` fixes the betas; the training scheduler (DDPM)
and the sampling scheduler (DDIM or DDPM, ``SamplingConfig.scheduler``) are
built from it, so ``alphas_cumprod`` -- the paper's gamma_t -- is the same
table in training, in the aligner's noisy inputs and in guided sampling.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from g2p.config import ConfigError, DiffusionConfig, SamplingConfig

__all__ = ["build_train_scheduler", "build_sampling_scheduler", "add_noise", "sample_timesteps", "randn_like"]

_SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def _common(cfg: DiffusionConfig) -> dict:
    if cfg.prediction_type != "epsilon":
        raise ConfigError(f"diffusion.prediction_type: only 'epsilon' is supported, got {cfg.prediction_type!r}")
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,  # latents are not bounded to [-1, 1]
    )


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process q(X_t | X_0) used for training the UNet and the aligner."""
    try:
        return DDPMScheduler(**_common(cfg))
    except NotImplementedError as e:
        raise ConfigError(f"diffusion.beta_schedule: {e}") from None


def build_sampling_scheduler(cfg: DiffusionConfig, sampling: SamplingConfig) -> SchedulerMixin:
    """The reverse-process scheduler, on the same betas as training.

    DDIM uses Stable Diffusion's settings (``steps_offset=1``,
    ``set_alpha_to_one=False``) and eta = 0 (deterministic given X_T).
    """
    kind = _SAMPLERS.get(sampling.scheduler)
    if kind is None:
        raise ConfigError(f"sampling.scheduler: {sampling.scheduler!r} is not one of {sorted(_SAMPLERS)}")
    extra = dict(steps_offset=1, set_alpha_to_one=False) if kind is DDIMScheduler else {}
    try:
        return kind(**_common(cfg), **extra)
    except NotImplementedError as e:
        raise ConfigError(f"diffusion.beta_schedule: {e}") from None


def add_noise(scheduler: SchedulerMixin, z0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Eq. 5: X_t = sqrt(gamma_t) X_0 + sqrt(1 - gamma_t) eps, gamma_t = prod_{s<=t} alpha_s.

    z0, eps: (B, C, h, w); t: (B,) integer timesteps in [0, T).
    """
    return scheduler.add_noise(z0, eps, t)  # (B, C, h, w)


def sample_timesteps(cfg: DiffusionConfig, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Training timesteps (B,) as int64, drawn as ``cfg.timestep_sampling`` says.

    - ``uniform``: t ~ U{0, ..., T-1} (DDPM's choice; every noise level equally).
    - ``logit_normal``: u = sigmoid(mean + std * n), n ~ N(0, 1), t = floor(u T).
      Mass concentrates around sigmoid(mean): mean 0 favours mid noise, mean > 0
      high noise, where short runs learn layout and colour.
    """
    T = cfg.num_train_timesteps
    if cfg.timestep_sampling == "uniform":
        return torch.randint(0, T, (batch,), generator=generator)
    if cfg.timestep_sampling == "logit_normal":
        n = torch.randn(batch, generator=generator)
        u = torch.sigmoid(cfg.timestep_logit_mean + cfg.timestep_logit_std * n)
        return (u * T).long().clamp_(0, T - 1)
    raise ConfigError(f"diffusion.timestep_sampling: unknown {cfg.timestep_sampling!r}")


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise shaped like ``x``, drawn on the generator's device (CPU draws are reproducible everywhere)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
