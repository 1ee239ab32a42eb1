"""The image autoencoder: Stable Diffusion's ``AutoencoderKL``, built or loaded.

The paper diffuses in Stable Diffusion's latent space. No pretrained weights
exist on our machines, so the VAE is either built from :class:`VAEConfig` with
random weights and trained with :func:`vae_loss` (our own "pretrained SD"
step), or loaded from a local diffusers Stable Diffusion folder
(``cfg.pretrained_path``, subfolder ``vae``). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from g2p.config import ConfigError, VAEConfig

__all__ = [
    "build_vae",
    "load_vae",
    "latent_size",
    "downsampling_factor",
    "encode",
    "decode",
    "foreground_weights",
    "vae_loss",
    "estimate_scaling_factor",
    "set_scaling_factor",
]


def downsampling_factor(cfg: VAEConfig) -> int:
    """Pixels per latent cell along one side: each level after the first halves the size."""
    return 2 ** (len(cfg.block_out_channels) - 1)


def latent_size(cfg: VAEConfig) -> int:
    """Side of the square latent grid, e.g. 64 px / 4 -> 16."""
    f = downsampling_factor(cfg)
    if cfg.image_size % f:
        raise ConfigError(f"vae.image_size: {cfg.image_size} is not divisible by the VAE's downsampling {f}")
    return cfg.image_size // f


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """The VAE of ``cfg``: loaded when ``cfg.pretrained_path`` is set, else randomly initialised."""
    if cfg.pretrained_path:
        return load_vae(cfg)
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ConfigError(f"vae.norm_num_groups: {cfg.norm_num_groups} does not divide block width {c}")
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
        scaling_factor=cfg.scaling_factor,
    )


def load_vae(cfg: VAEConfig) -> AutoencoderKL:
    """Load ``<pretrained_path>/vae`` from disk only, refusing a VAE the config does not describe.

    The UNet's channels and the latent grid are derived from ``cfg``; a
    pretrained VAE that disagrees would fail much later with a shape error, so
    the mismatch is reported here, naming the field to change.
    """
    path = Path(cfg.pretrained_path)
    if not (path / "vae").is_dir():
        raise ConfigError(f"vae.pretrained_path: no 'vae' folder under {str(path)!r}")
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True)
    got = vae.config
    if got.latent_channels != cfg.latent_channels:
        raise ConfigError(
            f"vae.latent_channels: the VAE at {str(path)!r} has latent_channels={got.latent_channels}, "
            f"the config says {cfg.latent_channels}"
        )
    if len(got.block_out_channels) != len(cfg.block_out_channels):
        raise ConfigError(
            f"vae.block_out_channels: the VAE at {str(path)!r} has {len(got.block_out_channels)} levels "
            f"(downsampling {2 ** (len(got.block_out_channels) - 1)}), the config has {len(cfg.block_out_channels)}"
        )
    if abs(got.scaling_factor - cfg.scaling_factor) > 1e-9:
        raise ConfigError(
            f"vae.scaling_factor: the VAE at {str(path)!r} uses {got.scaling_factor}, the config says {cfg.scaling_factor}"
        )
    return vae


def encode(
    vae: AutoencoderKL, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Images in [-1, 1] -> diffusion latents ``z0 = scaling_factor * E(x)``.

    By default the posterior *mean* is used: it is deterministic, so latents can
    be cached once per image, and its variance is tiny for a VAE trained with a
    small KL. ``sample=True`` draws from the posterior as SD's training scripts do.
    """
    dist = vae.encode(images).latent_dist  # (B, C, h, w) mean / std
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor  # (B, C, h, w)


def decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Diffusion latents -> images in [-1, 1] (clamped)."""
    x = vae.decode(latents / vae.config.scaling_factor).sample  # (B, 3, H, W)
    return x.clamp(-1.0, 1.0)


def foreground_weights(images: Tensor, *, foreground_weight: float, threshold: float) -> Tensor:
    """Per-pixel loss weights: 1 on the background, ``foreground_weight`` on the insect.

    Why: specimens fill a small share of a light, plain frame; unweighted MSE is
    dominated by background and the VAE learns blobs (design/CPU-BUDGET.md: 10x
    weighting cut foreground error 3x). The background colour is estimated per
    image as the median of its one-pixel border, so a grey or tinted
    background works too.

    1. border pixels -> per-image, per-channel median ``bg``  # (B, 3, 1, 1)
    2. foreground = max_channel |x - bg| > threshold           # (B, 1, H, W)
    3. weight = 1 + (foreground_weight - 1) * foreground
    """
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )  # (B, 3, 2H + 2W)
    bg = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
    fg = ((images - bg).abs().amax(dim=1, keepdim=True) > threshold).to(images.dtype)  # (B, 1, H, W)
    return 1.0 + (foreground_weight - 1.0) * fg


def vae_loss(
    vae: AutoencoderKL,
    images: Tensor,
    cfg: VAEConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Foreground-weighted reconstruction + small KL, for training our own VAE.

    Notation:
        x        images in [-1, 1]                     # (B, 3, H, W)
        q(z|x)   the encoder's diagonal Gaussian
        W        foreground_weights(x)                 # (B, 1, H, W)

    1. z ~ q(z|x) (reparameterised, seeded by ``generator``); x_hat = D(z)
    2. rec = sum(W * (x_hat - x)^2) / (3 * sum(W)): a weighted per-pixel MSE,
       normalised so its scale does not depend on the foreground share
    3. kl = KL(q(z|x) || N(0, I)) averaged over latent elements
    4. loss = rec + cfg.kl_weight * kl

    Returns ``{"loss", "rec", "kl", "mse"}`` (``mse``: unweighted, for logs).
    """
    # 1. posterior sample and reconstruction
    dist = vae.encode(images).latent_dist
    z = dist.sample(generator)  # (B, C, h, w)
    recon = vae.decode(z).sample  # (B, 3, H, W)
    # 2. weighted reconstruction
    w = foreground_weights(images, foreground_weight=cfg.foreground_weight, threshold=cfg.background_threshold)
    sq = (recon - images).pow(2)  # (B, 3, H, W)
    rec = (w * sq).sum() / (w.sum() * images.shape[1])
    # 3. KL per latent element
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
    # 4. total
    return {"loss": rec + cfg.kl_weight * kl, "rec": rec, "kl": kl, "mse": F.mse_loss(recon, images)}


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, images: Tensor) -> float:
    """1 / std of the unscaled posterior means, so latents enter diffusion at unit scale (as SD's 0.18215)."""
    z = vae.encode(images).latent_dist.mean  # (B, C, h, w)
    return float(1.0 / z.flatten().std().clamp_min(1e-8))


def set_scaling_factor(vae: AutoencoderKL, value: float) -> None:
    """Record the scaling factor in the VAE's own config, so it travels with ``save_pretrained``."""
    vae.register_to_config(scaling_factor=float(value))


def vae_version(vae: AutoencoderKL) -> str:
    """A content hash of the VAE (its diffusers config and weights): what cached latents are keyed by.

    Two VAEs with the same version encode every image to the same latents;
    a retrained (or swapped) VAE gets a new version, and latents computed
    with another one are refused rather than silently mixed.
    """
    import hashlib
    import json

    from safetensors.torch import save

    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not diffusers' bookkeeping
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(save({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}))
    return h.hexdigest()[:16]
