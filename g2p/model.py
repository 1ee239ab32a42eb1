"""G2PDiffusion as one object: every component built from one :class:`G2PConfig`.

    barcode, (lat, lon) -> tokenizer -> conditioner -> context (B, L, d), c (B, d)
    image -> VAE.encode -> z0 -> add_noise -> denoiser (UNet + LoRA) -> eps_hat
    z_t, t -> aligner -> e (B, d), aligned to c

A model saves to and loads from a folder of self-describing safetensors
(:mod:`g2p.train.checkpoint`: each file carries the config), with the LoRA
adapter also exported in diffusers' format under ``lora/``; training stages
live in :mod:`g2p.train.stages`, sampling in :mod:`g2p.generate`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
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

    def __init__(self, cfg: G2PConfig, *, from_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.conditioner = Conditioner.from_config(cfg.conditioner, cfg.tokenizer)
        d = cfg.conditioner.hidden_size
        use_vae = from_pretrained and bool(cfg.vae.pretrained_path)
        use_unet = from_pretrained and bool(cfg.unet.pretrained_path)
        self.vae = load_vae(cfg.vae) if use_vae else build_vae(cfg.vae)
        unet = load_unet(cfg.unet, cfg.vae, d) if use_unet else build_unet(cfg.unet, cfg.vae, d)
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
        for name in COMPONENTS:
            save_module(out / f"{name}.safetensors", getattr(self, name), self.cfg, name)
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
            check_architecture, config_from_checkpoint, load_module, load_state_dict,
        )

        src = Path(directory)
        if not (src / "denoiser.safetensors").exists():
            raise FileNotFoundError(f"{src}: not a G2PDiffusion checkpoint (no denoiser.safetensors)")
        saved = config_from_checkpoint(src / "denoiser.safetensors")
        if cfg is not None:
            check_architecture(saved, cfg, where=str(src))
        model = cls(saved, from_pretrained=False)
        if json.loads((src / "lora_state.json").read_text())["has_lora"]:
            model.add_lora()
        for name in COMPONENTS:
            load_module(src / f"{name}.safetensors", getattr(model, name))
        model.negative_bank = load_state_dict(src / "negative_bank.safetensors")["negative_bank"]
        return model.to(device).eval()


# Modules saved one file each; the LoRA adapter travels inside denoiser.safetensors
# (peft's key names) and again under lora/ in diffusers' format.
COMPONENTS = ("conditioner", "vae", "denoiser", "aligner")
