"""The pipeline's parts that diffusers does not have: its schedulers' checks and two model components.

- :func:`build_scheduler`, :func:`check_scheduler`: which schedulers guidance is
  right for (every epsilon-space scheduler of Stable Diffusion's family);
- :func:`current_alpha_bar`: gamma_t of the step being taken, for eq. 8;
- :class:`ConditionerModel` (the conditioner + the null context of CFG) and
  :class:`AlignerModel` (the aligner + its negative bank), ``ModelMixin,
  ConfigMixin`` so that ``save_pretrained`` / ``from_pretrained`` handle them.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from g2p.config import AlignerConfig, ConditionerConfig, ConfigError, DiffusionConfig, _build
from g2p.diffusion.guidance import CondFn, make_aligner_cond_fn
from g2p.diffusion.schedule import build_sampling_scheduler
from g2p.models.aligner import Aligner
from g2p.models.conditioner import Conditioner, ConditionerOutput

__all__ = ["build_scheduler", "check_scheduler", "alpha_bar_at", "current_alpha_bar", "ConditionerModel",
           "AlignerModel"]


# ----------------------------------------------------------------------------
# schedulers
# ----------------------------------------------------------------------------

def build_scheduler(diffusion: DiffusionConfig, name: str) -> SchedulerMixin:
    """The sampling scheduler ``name`` on the training betas (:func:`g2p.diffusion.schedule.build_sampling_scheduler`)."""
    try:
        return build_sampling_scheduler(diffusion, name)
    except ConfigError as e:
        raise ValueError(str(e).replace("sampling.scheduler", "scheduler")) from None


# EDM schedulers precondition the model's output (c_skip, c_out): not an epsilon interface.
_PRECONDITIONED = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler the pipeline cannot guide correctly, naming it.

    Supported: every scheduler of Stable Diffusion's compatible family (the
    ``_compatibles`` of ``DDPMScheduler``: DDPM, DDIM, PNDM, LMS, Euler, Euler
    ancestral, Heun, DPM-Solver(++), UniPC, DEIS, KDPM2) that predicts
    epsilon. They all consume the noise prediction, and their model input
    ``scale_model_input(x, t)`` is the variance-preserving X_t, so guidance
    applied to eps (eq. 8, with gamma_t read at t) is right for each of them.
    """
    name = type(scheduler).__name__
    allowed = {c if isinstance(c, str) else c.__name__ for c in DDPMScheduler._compatibles} | {"DDPMScheduler"}
    allowed -= _PRECONDITIONED
    if not isinstance(scheduler, SchedulerMixin) or name not in allowed:
        raise ValueError(f"scheduler: {name} is not supported (it is not an epsilon-space scheduler of "
                         f"Stable Diffusion's family; supported: {sorted(allowed)})")
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"scheduler: {name} with prediction_type={pred!r} is not supported: "
                         f"the UNet predicts epsilon")


def alpha_bar_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """gamma_t at a (possibly fractional) timestep: exact at integers, log-sigma interpolation between.

    Sigma-space schedulers (Euler, ...) step at fractional t found by the same
    log-sigma interpolation, so this is its inverse.
    """
    ac = alphas_cumprod.double()
    tf = t.double().clamp(0, len(ac) - 1)
    lo = tf.floor().long()
    hi = (lo + 1).clamp(max=len(ac) - 1)
    frac = tf - lo.double()
    if bool((frac == 0).all()):
        return ac[lo].float()
    log_sigma = (((1 - ac) / ac).sqrt()).log()
    ls = (1 - frac) * log_sigma[lo] + frac * log_sigma[hi]
    return (1.0 / (1.0 + (2 * ls).exp())).float()


def current_alpha_bar(scheduler: SchedulerMixin, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """gamma_t of the step being taken: from the scheduler's own sigma where it keeps one
    (gamma = 1 / (1 + sigma^2), the VP <-> sigma-space relation), else from the table at t."""
    idx, sigmas = getattr(scheduler, "step_index", None), getattr(scheduler, "sigmas", None)
    if idx is not None and sigmas is not None and idx < len(sigmas):
        sigma = sigmas[idx].double()
        return (1.0 / (1.0 + sigma**2)).float().reshape(1)
    return alpha_bar_at(alphas_cumprod, t.reshape(1))


# ----------------------------------------------------------------------------
# components that diffusers does not have
# ----------------------------------------------------------------------------


class ConditionerModel(ModelMixin, ConfigMixin):
    """The environment-enhanced DNA conditioner (paper 3.2) and the null condition of CFG.

    ``conditioner_config`` is :class:`ConditionerConfig` as a dict. The null condition
    (one learned token, then masked padding) is what classifier-free guidance
    contrasts with, so it lives beside the conditioner, as the empty prompt's
    embedding does in Stable Diffusion.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, conditioner_config: dict[str, Any] | None = None, vocab_size: int = 261) -> None:
        super().__init__()
        cfg = _build(ConditionerConfig, dict(conditioner_config or {}), "conditioner")
        self.conditioner = Conditioner(cfg, vocab_size=vocab_size)
        self.null_context = nn.Parameter(torch.zeros(1, cfg.hidden_size))  # (1, d)

    @property
    def hidden_size(self) -> int:
        return int(self.conditioner.cfg.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, lat: Tensor, lon: Tensor,
                has_place: Tensor) -> ConditionerOutput:
        return self.conditioner(input_ids, attention_mask, lat, lon, has_place)

    def null_condition(self, batch: int, length: int) -> tuple[Tensor, Tensor]:
        """``batch`` copies of the null context padded to ``length`` tokens (B, L, d), and its mask (B, L)."""
        ctx = self.null_context.new_zeros(batch, length, self.hidden_size)
        ctx[:, 0] = self.null_context[0]
        mask = torch.zeros(batch, length, dtype=torch.bool, device=ctx.device)
        mask[:, 0] = True
        return ctx, mask


class AlignerModel(ModelMixin, ConfigMixin):
    """The aligner g_phi(X_t, t) of paper 3.4 and the negative bank (M, d) its guidance contrasts with."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, aligner_config: dict[str, Any] | None = None, latent_channels: int = 4,
                 latent_size: int = 16, embed_dim: int = 128, num_negatives: int = 0) -> None:
        super().__init__()
        cfg = _build(AlignerConfig, dict(aligner_config or {}), "aligner")
        self.aligner = Aligner(cfg, latent_channels, latent_size, embed_dim)
        self.register_buffer("negative_bank", torch.zeros(num_negatives, embed_dim))  # (M, d)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.aligner(x_t, t)

    def cond_fn(self) -> CondFn:
        """grad_{x_t} log p_phi(c | x_t) against the negative bank (see guidance.make_aligner_cond_fn)."""
        return make_aligner_cond_fn(self.aligner, self.negative_bank)
