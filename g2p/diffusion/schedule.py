"""The noise schedule (paper eqs. 3-5) on diffusers' schedulers.

One :class:`DiffusionConfig` fixes the betas; the training scheduler (DDPM)
and the sampling scheduler (``SamplingConfig.scheduler``: DDIM, DDPM, DPM-Solver++, UniPC, Euler) are
built from it, so ``alphas_cumprod`` -- the paper's gamma_t -- is the same
table in training, in the aligner's noisy inputs and in guided sampling.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from g2p.config import SCHEDULER_NAMES, ConfigError, DiffusionConfig, SamplingConfig

__all__ = ["SCHEDULERS", "build_train_scheduler", "build_sampling_scheduler", "add_noise", "sample_timesteps", "randn_like"]

# Every sampler starts below t = T - 1 ("leading" spacing, steps_offset 1, Stable Diffusion's setting:
# 25 steps start at t = 961, 10 at t = 901). With epsilon prediction a step estimates
# x0 = (X_t - sqrt(1 - gamma_t) eps) / sqrt(gamma_t), and our default cosine schedule
# (squaredcos_cap_v2) has gamma_999 = 2.4e-9: the UNet's error on eps (RMS 0.06 for the trained
# default model at t = 999) became an x0 error of ~1,200, and every scheduler that started at
# t = 999 ("trailing", "linspace") gave saturated noise (measured 2026-12-04 on `make run`'s model:
# seen species accuracy 4%, 50.6% with leading spacing; gamma_901 = 0.023, gamma_961 = 0.0035).
START_BELOW_T = {"timestep_spacing": "leading", "steps_offset": 1}

# ``sampling.scheduler`` names -> (diffusers class, settings on top of the training betas).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {**START_BELOW_T, "set_alpha_to_one": False, "clip_sample": False}),
    "ddpm": (DDPMScheduler, {**START_BELOW_T, "clip_sample": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler,
                    {**START_BELOW_T, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, dict(START_BELOW_T)),
    "euler": (EulerDiscreteScheduler, dict(START_BELOW_T)),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def _common(cfg: DiffusionConfig) -> dict:
    if cfg.prediction_type != "epsilon":
        raise ConfigError(f"diffusion.prediction_type: only 'epsilon' is supported, got {cfg.prediction_type!r}")
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process q(X_t | X_0) used for training the UNet and the aligner."""
    try:
        return DDPMScheduler(**_common(cfg), clip_sample=False)  # latents are not bounded to [-1, 1]
    except NotImplementedError as e:
        raise ConfigError(f"diffusion.beta_schedule: {e}") from None


def build_sampling_scheduler(cfg: DiffusionConfig, name: str | SamplingConfig) -> SchedulerMixin:
    """The reverse-process scheduler ``name`` (``sampling.scheduler``) on the training betas.

    Every scheduler uses "leading" timestep spacing with steps_offset 1, so 25
    steps start at t = 961, not at t = 999 (see ``START_BELOW_T``); DDIM at eta = 0 is
    deterministic given X_T. DPM-Solver++ is second order, multistep.
    """
    name = name.scheduler if isinstance(name, SamplingConfig) else name
    if name not in SCHEDULERS:
        raise ConfigError(f"sampling.scheduler: {name!r} is not one of {list(SCHEDULERS)}")
    kind, extra = SCHEDULERS[name]
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
