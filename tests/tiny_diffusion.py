"""Tiny, seeded diffusion components shared by the diffusion/aligner/sampler/LoRA tests.

Sizes in the spirit of diffusers' own tests (block widths 8/16, 2 groups),
so every test runs in well under a second of model time on 2 CPU cores.
"""

from __future__ import annotations

import torch

from g2p.config import G2PConfig, preset
from g2p.models.aligner import Aligner
from g2p.models.unet import Denoiser, build_unet
from g2p.models.vae import build_vae, latent_size

D = 16  # conditioner width (cross_attention_dim)
L = 5  # context tokens


def tiny_config() -> G2PConfig:
    return preset("tiny").override(
        {
            "vae": {"image_size": 16, "block_out_channels": [8, 16], "norm_num_groups": 2, "latent_channels": 4},
            "unet": {
                "block_out_channels": [8, 16], "cross_attention_levels": [False, True],
                "attention_head_dim": 2, "norm_num_groups": 2,
            },
            "lora": {"rank": 2, "alpha": 4},
            "aligner": {"patch_size": 2, "width": 16, "num_layers": 1, "num_heads": 2},
            "sampling": {"steps": 4, "negative_bank_size": 4},
        }
    )


def tiny_denoiser(cfg: G2PConfig, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(build_unet(cfg.unet, cfg.vae, D))


def tiny_vae(cfg: G2PConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_vae(cfg.vae)


def tiny_aligner(cfg: G2PConfig, seed: int = 0) -> Aligner:
    torch.manual_seed(seed)
    return Aligner(cfg.aligner, cfg.vae.latent_channels, latent_size(cfg.vae), D)


def latent_shape(cfg: G2PConfig) -> tuple[int, int, int]:
    s = latent_size(cfg.vae)
    return (cfg.vae.latent_channels, s, s)


def random_context(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context (B, L, D), mask (B, L), pooled (B, D)) as a conditioner would give them."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, L, D, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, -1] = False  # one padding token
    pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return ctx, mask, pooled
