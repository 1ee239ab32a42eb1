"""The DNA-image aligner g_phi(X_t, t) of paper 3.4 ("dynamic cross-modality alignment").

A small transformer over patches of *noisy* latents, conditioned on the
timestep, that embeds X_t into the conditioner's space. Trained with InfoNCE
against the pooled condition c at every noise level (as guided-diffusion's
classifier is trained on q_sample(x0, t)), so its gradient
grad_{X_t} log p_phi(c | X_t) is meaningful all along the sampling trajectory.
It must stay small next to the UNet: its forward and backward run once per
sampling step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from g2p.config import AlignerConfig, ConfigError
from g2p.diffusion.losses import contrastive_logits, info_nce
from g2p.diffusion.schedule import add_noise, randn_like

__all__ = ["Aligner", "aligner_loss"]

_MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: keeps the temperature from collapsing


class Aligner(nn.Module):
    """g_phi(X_t, t) -> L2-normalised embedding in c's space.

    1. patchify X_t with a stride-p conv, add learned positions   # (B, N, W)
    2. timestep: sinusoidal(t) -> MLP, added to every token and a CLS token
    3. pre-norm transformer encoder, final LayerNorm
    4. pool (CLS or mean over patches) -> linear -> normalise    # (B, d)
    """

    def __init__(self, cfg: AlignerConfig, latent_channels: int, latent_size: int, embed_dim: int) -> None:
        super().__init__()
        if latent_size % cfg.patch_size:
            raise ConfigError(f"aligner.patch_size: {cfg.patch_size} does not divide the latent size {latent_size}")
        if cfg.width % cfg.num_heads:
            raise ConfigError(f"aligner.num_heads: {cfg.num_heads} does not divide aligner.width {cfg.width}")
        self.cfg = cfg
        w = cfg.width
        n = (latent_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(latent_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, n, w) * 0.02)  # (1, N, W)
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)  # (1, 1, W)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        layer = nn.TransformerEncoderLayer(
            w, cfg.num_heads, 4 * w, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, embed_dim)
        # CLIP-style learnable temperature, stored as log(1 / tau)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

    @property
    def logit_scale(self) -> Tensor:
        """1 / temperature, clamped at 100."""
        return self.log_logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, h, w), t (B,) or scalar -> unit-norm embeddings (B, d)."""
        b = x_t.shape[0]
        # 1. patches
        tok = self.patch(x_t).flatten(2).transpose(1, 2) + self.pos  # (B, N, W)
        # 2. timestep
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)  # (B,)
        temb = get_timestep_embedding(t, self.cfg.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_mlp(temb.to(x_t.dtype))[:, None, :]  # (B, 1, W)
        tok = torch.cat([self.cls.expand(b, -1, -1), tok], dim=1) + temb  # (B, 1 + N, W)
        # 3. encoder
        h = self.norm(self.encoder(tok))  # (B, 1 + N, W)
        # 4. pool and project
        pooled = h[:, 0] if self.cfg.pooling == "cls" else h[:, 1:].mean(dim=1)  # (B, W)
        return F.normalize(self.proj(pooled), dim=-1)  # (B, d)

    def log_prob(self, x_t: Tensor, t: Tensor, candidates: Tensor, target: Tensor) -> Tensor:
        """log p_phi(c = candidates[target] | X_t): contrastive log-softmax over ``candidates`` (K, d).

        x_t (B, C, h, w), target (B,) indices into candidates -> (B,).
        """
        logits = contrastive_logits(self(x_t, t), candidates, self.logit_scale)  # (B, K)
        return logits.log_softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


def aligner_loss(
    aligner: Aligner,
    z0: Tensor,
    c: Tensor,
    scheduler: SchedulerMixin,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 9 on noisy latents at uniformly random t: the "dynamic" alignment.

    Notation:
        z0  clean latents                                # (B, C, h, w)
        c   pooled conditioner output for each latent    # (B, d)

    1. t ~ U{0, ..., T-1}, eps ~ N(0, I): every noise level the sampler visits
    2. X_t = add_noise(z0, eps, t)                      (eq. 5)
    3. InfoNCE(g_phi(X_t, t), c) with the aligner's temperature

    ``c`` is detached: the conditioner is trained with the UNet (eq. 6), the
    aligner only learns to read it.
    """
    b = z0.shape[0]
    # 1. noise levels and noise
    T = scheduler.config.num_train_timesteps
    dev = generator.device if generator is not None else z0.device
    t = torch.randint(0, T, (b,), generator=generator, device=dev).to(z0.device)  # (B,)
    eps = randn_like(z0, generator)  # (B, C, h, w)
    # 2. forward process
    x_t = add_noise(scheduler, z0, eps, t)
    # 3. contrastive loss
    e = aligner(x_t, t)  # (B, d)
    return info_nce(e, c.detach(), aligner.logit_scale, symmetric=aligner.cfg.symmetric_loss)
