"""G2PDiffusion as one object: every component built from one :class:`G2PConfig`.

    barcode, (lat, lon) -> tokenizer -> conditioner -> context (B, L, d), c (B, d)
    image -> VAE.encode -> z0 -> add_noise -> denoiser (UNet + LoRA) -> eps_hat
    z_t, t -> aligner -> e (B, d), aligned to c

A model saves to and loads from a folder of self-describing safetensors
(:mod:`g2p.train.checkpoint`: each file carries the config), with the LoRA
adapter also exported in diffusers' format under ``lora/``; training stages
live in :mod:`g2p.train.stages`, sampling in :mod:`g2p.pipeline` (``G2PDiffusionPipeline.from_model(model)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn

from g2p.config import G2PConfig
from g2p.models.aligner import Aligner
from g2p.models.conditioner import Conditioner, ConditionerOutput
from g2p.models.unet import Denoiser, add_lora, build_unet, load_unet
from g2p.models.vae import build_vae, latent_size, load_vae
from g2p.tokenizer import build_tokenizer


class G2PDiffusion(nn.Module):
    """Tokenizer, conditioner, VAE, denoiser (UNet + null context, LoRA once added) and aligner.

    ``negative_bank`` (M, d) holds pooled conditions of training records: the
    aligner's guidance contrasts the true condition against them at sampling.
    """

    def __init__(self, cfg: G2PConfig, *, from_pretrained: bool = True,
                 diffusers_configs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Build every component from ``cfg``.

        The VAE and UNet come, in this order of precedence, from
        ``diffusers_configs["vae" | "unet"]`` (a checkpoint's exact diffusers
        configs, random weights to be loaded over), from the local Stable
        Diffusion folder ``cfg.*.pretrained_path`` (when ``from_pretrained``),
        or from ``cfg``'s fields. A loaded folder is the truth about its own
        architecture: ``self.cfg`` records its widths, levels and groups, so the
        config a checkpoint carries describes the weights in it.
        """
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.conditioner = Conditioner.from_config(cfg.conditioner, cfg.tokenizer)
        d = cfg.conditioner.hidden_size
        given = diffusers_configs or {}
        use_vae = from_pretrained and bool(cfg.vae.pretrained_path) and "vae" not in given
        use_unet = from_pretrained and bool(cfg.unet.pretrained_path) and "unet" not in given
        if "vae" in given:
            self.vae = AutoencoderKL.from_config(dict(given["vae"]))
        else:
            self.vae = load_vae(cfg.vae) if use_vae else build_vae(cfg.vae)
        if "unet" in given:
            unet = UNet2DConditionModel.from_config(dict(given["unet"]))
        else:
            unet = load_unet(cfg.unet, cfg.vae, d) if use_unet else build_unet(cfg.unet, cfg.vae, d)
        if use_vae:
            self.cfg = self.cfg.override({"vae": _vae_architecture(self.vae)})
        if use_unet:
            self.cfg = self.cfg.override({"unet": _unet_architecture(unet)})
        self.denoiser = Denoiser(unet)
        self.aligner = Aligner(cfg.aligner, cfg.vae.latent_channels, latent_size(cfg.vae), d)
        self.register_buffer("negative_bank", torch.zeros(0, d), persistent=False)
        self.has_lora = False

    # -- structure -------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = latent_size(self.cfg.vae)
        return (self.cfg.vae.latent_channels, s, s)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def add_lora(self) -> None:
        """Freeze the base UNet and add the LoRA adapter (paper 3.3); idempotent."""
        if not self.has_lora:
            add_lora(self.denoiser.unet, self.cfg.lora)
            self.has_lora = True

    def set_vae_scaling_factor(self, value: float) -> None:
        """Record a measured latent scale in the VAE and in the config a checkpoint carries."""
        from g2p.models.vae import set_scaling_factor

        set_scaling_factor(self.vae, value)
        self.cfg = self.cfg.set("vae.scaling_factor", float(value))

    # -- data flow -------------------------------------------------------------
    def tokenize(self, barcodes: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Barcodes -> input_ids, attention_mask (B, L) on the model's device."""
        enc = self.tokenizer(list(barcodes), padding=True, truncation=True, return_tensors="pt")
        dev = self.device
        return enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    def condition(self, barcodes: Sequence[str], lat: Tensor, lon: Tensor, has_place: Tensor) -> ConditionerOutput:
        """The conditioner's context (B, L, d), mask and pooled c (B, d) for barcodes and places."""
        ids, mask = self.tokenize(barcodes)
        dev = self.device
        return self.conditioner(ids, mask, lat.to(dev), lon.to(dev), has_place.to(dev))

    # -- persistence -----------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole generator as self-describing safetensors (see module docstring)."""
        from g2p.models.unet import save_lora_adapter
        from g2p.train.checkpoint import save_module

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        nets = {"vae": self.vae, "denoiser": self.denoiser.unet}
        for name in COMPONENTS:
            # The VAE's and UNet's own diffusers configs travel too: a UNet loaded
            # from a Stable Diffusion folder has settings cfg has no field for.
            extra = {DIFFUSERS_CONFIG_KEY: _diffusers_config_json(nets[name])} if name in nets else None
            save_module(out / f"{name}.safetensors", getattr(self, name), self.cfg, name, extra=extra)
        save_module(out / "negative_bank.safetensors", {"negative_bank": self.negative_bank}, self.cfg,
                    "negative_bank")
        if self.has_lora:  # also in the format diffusers' load_lora_weights reads
            save_lora_adapter(self.denoiser.unet, out / "lora")
        (out / "lora_state.json").write_text(json.dumps({"has_lora": self.has_lora}) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, cfg: G2PConfig | None = None,
                        device: str | torch.device = "cpu") -> "G2PDiffusion":
        """Load a folder written by :meth:`save_pretrained`.

        With ``cfg``, refuse a checkpoint whose architecture differs, naming
        the field (``unet.block_out_channels is ... in the checkpoint but ...``).
        """
        from g2p.train.checkpoint import (
            check_architecture, config_from_checkpoint, load_module, load_state_dict, read_metadata,
        )

        src = Path(directory)
        if not (src / "denoiser.safetensors").exists():
            raise FileNotFoundError(f"{src}: not a G2PDiffusion checkpoint (no denoiser.safetensors)")
        saved = config_from_checkpoint(src / "denoiser.safetensors")
        if cfg is not None:
            check_architecture(saved, cfg, where=str(src))
        # Rebuild the VAE and UNet from their saved diffusers configs (older
        # checkpoints without them: from the saved cfg's fields), never from a folder.
        nets = {}
        for net, name in (("vae", "vae"), ("unet", "denoiser")):
            raw = read_metadata(src / f"{name}.safetensors").get(DIFFUSERS_CONFIG_KEY)
            if raw is not None:
                nets[net] = json.loads(raw)
        has_lora = json.loads((src / "lora_state.json").read_text())["has_lora"]
        if has_lora and "unet" in nets:  # the saved UNet says whether it has the pooled embedding
            saved = saved.set("lora.pooled_embedding", nets["unet"].get("class_embed_type") == "projection")
        model = cls(saved, from_pretrained=False, diffusers_configs=nets)
        if has_lora:
            model.add_lora()
        for name in COMPONENTS:
            load_module(src / f"{name}.safetensors", getattr(model, name))
        model.negative_bank = load_state_dict(src / "negative_bank.safetensors")["negative_bank"]
        return model.to(device).eval()


# Modules saved one file each; the LoRA adapter travels inside denoiser.safetensors
# (peft's key names) and again under lora/ in diffusers' format.
COMPONENTS = ("conditioner", "vae", "denoiser", "aligner")
DIFFUSERS_CONFIG_KEY = "diffusers_config"  # safetensors metadata of vae/denoiser: the module's own config


def _diffusers_config_json(net: AutoencoderKL | UNet2DConditionModel) -> str:
    """The module's diffusers config as JSON, without the local folder it was read from."""
    conf = json.loads(net.to_json_string())
    conf.pop("_name_or_path", None)
    return json.dumps(conf, sort_keys=True)


def _unet_architecture(unet: UNet2DConditionModel) -> dict[str, Any]:
    """The :class:`UNetConfig` fields a loaded UNet actually has (those the config can express)."""
    c = unet.config
    arch: dict[str, Any] = {
        "block_out_channels": list(c.block_out_channels),
        "cross_attention_levels": ["CrossAttn" in t for t in c.down_block_types],
        "norm_num_groups": c.norm_num_groups,
    }
    # SD 2.x gives per-level lists here; cfg has one int, the diffusers config keeps the list.
    for name in ("layers_per_block", "attention_head_dim"):
        if isinstance(getattr(c, name), int):
            arch[name] = getattr(c, name)
    return arch


def _vae_architecture(vae: AutoencoderKL) -> dict[str, Any]:
    """The :class:`VAEConfig` fields a loaded VAE actually has (levels, latent channels and scale are checked)."""
    c = vae.config
    return {"block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "norm_num_groups": c.norm_num_groups}
