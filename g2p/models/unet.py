"""The denoiser f_theta(X_t, t, c): Stable Diffusion's UNet, LoRA-finetuned (paper 3.3).

This is the project's only peft user. The UNet is either built from
:class:`UNetConfig` (random init, for our own "pretrained SD" step) or loaded
from a local diffusers Stable Diffusion folder (subfolder ``unet``). LoRA
adapters are added with diffusers' own ``add_adapter`` and exported in the
format diffusers' ``load_lora_weights`` reads, so an adapter trained here
drops into any Stable Diffusion pipeline that shares the base UNet.

:class:`Denoiser` wraps the UNet with the learned *null context* used for
condition dropout in training and for classifier-free guidance at sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from g2p.config import ConfigError, LoRAConfig, UNetConfig, VAEConfig
from g2p.models.vae import latent_size

__all__ = [
    "build_unet",
    "load_unet",
    "add_lora",
    "add_pooled_embedding",
    "freeze_base",
    "trainable_parameters",
    "get_lora_state_dict",
    "set_lora_state_dict",
    "save_lora_adapter",
    "load_lora_adapter",
    "Denoiser",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, what load_lora_weights looks for


# ----------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------


def build_unet(cfg: UNetConfig, vae_cfg: VAEConfig, context_dim: int) -> UNet2DConditionModel:
    """The UNet of ``cfg`` over the VAE's latents, cross-attending to ``context_dim``-wide tokens.

    Loaded from ``cfg.pretrained_path`` when set, else randomly initialised with
    ``CrossAttnDownBlock2D`` at the levels ``cfg.cross_attention_levels`` marks
    and ``DownBlock2D`` elsewhere (mirrored on the way up). As in every SD-1.x
    config, diffusers reads ``attention_head_dim`` as the *number of heads*
    (diffusers issue 2011); we pass it through unchanged so pretrained and
    built UNets mean the same thing by it.
    """
    if cfg.pretrained_path:
        return load_unet(cfg, vae_cfg, context_dim)
    if len(cfg.cross_attention_levels) != len(cfg.block_out_channels):
        raise ConfigError(
            f"unet.cross_attention_levels: {len(cfg.cross_attention_levels)} entries for "
            f"{len(cfg.block_out_channels)} levels in unet.block_out_channels"
        )
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ConfigError(f"unet.norm_num_groups: {cfg.norm_num_groups} does not divide block width {c}")
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in cfg.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cfg.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size(vae_cfg),
        in_channels=vae_cfg.latent_channels,
        out_channels=vae_cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=context_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def load_unet(cfg: UNetConfig, vae_cfg: VAEConfig, context_dim: int) -> UNet2DConditionModel:
    """Load ``<pretrained_path>/unet`` from disk only; refuse one that cannot take our latents or context."""
    path = Path(cfg.pretrained_path)
    if not (path / "unet").is_dir():
        raise ConfigError(f"unet.pretrained_path: no 'unet' folder under {str(path)!r}")
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True)
    got = unet.config
    if got.cross_attention_dim != context_dim:
        raise ConfigError(
            f"conditioner.hidden_size: the UNet at {str(path)!r} has cross_attention_dim="
            f"{got.cross_attention_dim}, but the conditioner is {context_dim} wide; "
            f"set conditioner.hidden_size to {got.cross_attention_dim}"
        )
    for name in ("in_channels", "out_channels"):
        if getattr(got, name) != vae_cfg.latent_channels:
            raise ConfigError(
                f"vae.latent_channels: the UNet at {str(path)!r} has {name}={getattr(got, name)}, "
                f"but the VAE makes {vae_cfg.latent_channels}-channel latents"
            )
    return unet


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------


def add_lora(unet: UNet2DConditionModel, cfg: LoRAConfig, adapter_name: str = "default") -> None:
    """Freeze the base UNet and inject a LoRA adapter (only its A/B matrices train).

    peft initialises B = 0, so the adapted UNet starts exactly at the base one.
    With ``cfg.finetune_base`` the base weights train too (the whole UNet).
    """
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,
        ),
        adapter_name=adapter_name,
    )
    if cfg.pooled_embedding:
        add_pooled_embedding(unet)
    if cfg.finetune_base:
        unet.requires_grad_(True)


def add_pooled_embedding(unet: UNet2DConditionModel) -> None:
    """Give the UNet a trainable embedding of the pooled condition, added to its timestep embedding.

    This is diffusers' own ``class_embed_type="projection"`` path (a
    ``TimestepEmbedding`` MLP from ``cross_attention_dim`` to the time-embedding
    width), registered in the UNet's config so a saved UNet rebuilds it. Its
    last layer starts at zero, so like the LoRA matrices it starts exactly at
    the base UNet; it trains in full. Idempotent (a loaded UNet already has it).
    """
    if unet.class_embedding is not None:
        if unet.config.class_embed_type != "projection":
            raise ConfigError(f"lora.pooled_embedding: the UNet already has a class embedding of type "
                              f"{unet.config.class_embed_type!r}")
        unet.class_embedding.requires_grad_(True)
        return
    from diffusers.models.embeddings import TimestepEmbedding

    d = int(unet.config.cross_attention_dim)
    time_embed_dim = unet.time_embedding.linear_2.out_features
    emb = TimestepEmbedding(d, time_embed_dim, act_fn=unet.config.act_fn)
    nn.init.zeros_(emb.linear_2.weight)
    nn.init.zeros_(emb.linear_2.bias)
    p = next(unet.parameters())
    unet.class_embedding = emb.to(device=p.device, dtype=p.dtype)
    unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=d)


def freeze_base(module: nn.Module,
                keep: tuple[str, ...] = ("lora_", "null_context", "class_embedding.")) -> None:
    """Freeze every parameter of ``module`` except those whose name holds one of ``keep``.

    The default trains what LoRA finetuning of the paper trains: the adapter
    matrices, plus the Denoiser's learned null context (and the pooled-condition
    embedding, when the UNet has one).
    """
    for name, p in module.named_parameters():
        p.requires_grad_(any(k in name for k in keep))


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires grad: what the optimiser should get."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def get_lora_state_dict(unet: UNet2DConditionModel, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors in peft's key format (``...to_q.lora_A.weight``), detached copies."""
    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in sd.items()}


def set_lora_state_dict(unet: UNet2DConditionModel, state: dict[str, Tensor], adapter_name: str = "default") -> None:
    """Load tensors from :func:`get_lora_state_dict` into an existing adapter; unknown keys are errors."""
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA state has keys the UNet's adapter lacks: {sorted(unexpected)[:5]}")


def save_lora_adapter(
    unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default"
) -> Path:
    """Write the adapter as ``<directory>/pytorch_lora_weights.safetensors`` in diffusers' format.

    Keys are converted peft -> diffusers and prefixed ``unet.`` by
    ``StableDiffusionLoraLoaderMixin.save_lora_weights``; the LoraConfig
    (rank, alpha, targets) travels in the safetensors metadata so the loader
    does not have to guess alpha from the tensors.
    """
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    meta = unet.peft_config[adapter_name].to_dict()
    meta = json.loads(json.dumps(meta, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=str(directory),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=meta,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return Path(directory) / LORA_WEIGHT_NAME


def load_lora_adapter(
    unet: UNet2DConditionModel, directory: str | Path, adapter_name: str = "default"
) -> None:
    """Load an adapter written by :func:`save_lora_adapter` (or any SD-1.x diffusers LoRA) with diffusers' loader."""
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(directory), weight_name=LORA_WEIGHT_NAME, local_files_only=True, return_lora_metadata=True
    )
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        state, network_alphas=alphas, unet=unet, adapter_name=adapter_name, metadata=metadata
    )


# ----------------------------------------------------------------------------
# The denoiser with its null context
# ----------------------------------------------------------------------------


class Denoiser(nn.Module):
    """f_theta(X_t, t, c): the UNet plus a learned null context for condition dropout and CFG.

    The null condition is one learned token; a dropped example's context is
    that token followed by masked padding, so conditional and null examples
    share one batch (one UNet pass for classifier-free guidance). Masked keys
    get a -10000 bias in diffusers' cross-attention, i.e. weight exactly 0 in
    float32, so the padding length does not change the null prediction.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        d = unet.config.cross_attention_dim
        # At the scale of LayerNorm'd conditioner tokens (unit variance per element).
        self.null_context = nn.Parameter(torch.randn(1, d))  # (1, d)

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def null_condition(self, batch: int, length: int) -> tuple[Tensor, Tensor]:
        """``batch`` copies of the null context padded to ``length`` tokens, and their mask."""
        ctx = self.null_context.new_zeros(batch, length, self.context_dim)  # (B, L, d)
        ctx = torch.cat([self.null_context.expand(batch, 1, -1), ctx[:, 1:]], dim=1)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=ctx.device)  # (B, L)
        mask[:, 0] = True
        return ctx, mask

    def drop_condition(
        self, context: Tensor, context_mask: Tensor | None, drop: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Replace the context of examples where ``drop`` (B,) is True by the null condition."""
        b, length, _ = context.shape  # (B, L, d)
        if context_mask is None:
            context_mask = torch.ones(b, length, dtype=torch.bool, device=context.device)
        null_ctx, null_mask = self.null_condition(b, length)
        d3 = drop.view(b, 1, 1)
        ctx = torch.where(d3, null_ctx.to(context.dtype), context)  # (B, L, d)
        mask = torch.where(drop.view(b, 1), null_mask, context_mask.bool())  # (B, L)
        return ctx, mask

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Predicted noise eps_hat for latents ``x_t`` (B, C, h, w) at timesteps ``t`` (B,) or scalar.

        With a pooled-condition embedding (``lora.pooled_embedding``), the
        masked mean of the context tokens (the conditioner's pooled c; for the
        null condition, the null token) also enters the timestep embedding.
        """
        mask = None if context_mask is None else context_mask.to(x_t.dtype)  # (B, L), 1 = attend
        pooled = None
        if self.unet.class_embedding is not None:
            pooled = pool_context(context, mask)  # (B, d)
        return self.unet(x_t, t, encoder_hidden_states=context, encoder_attention_mask=mask,
                         class_labels=pooled).sample


def pool_context(context: Tensor, mask: Tensor | None) -> Tensor:
    """Masked mean of context tokens (B, L, d) -> (B, d): the conditioner's mean pooling."""
    if mask is None:
        return context.mean(dim=1)
    w = mask.to(context.dtype).unsqueeze(-1)  # (B, L, 1)
    return (context * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
