"""``Generator``: barcodes and places in, phenotype images out (Algorithm 1).

    gen = Generator.from_checkpoint("models/g2pdiffusion")
    images = gen.generate(["ACGT..."], [45.0], [-75.0], n=4, seed=0)  # (1, 4, 3, H, W) uint8

The same seed gives the same images on the same machine: all noise is drawn
from one CPU ``torch.Generator`` seeded per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from g2p.config import G2PConfig
from g2p.data.dataset import to_uint8
from g2p.data.normalise import check_barcode, check_coordinates
from g2p.diffusion.guidance import make_aligner_cond_fn
from g2p.diffusion.sampler import sample_latents
from g2p.diffusion.schedule import build_sampling_scheduler
from g2p.model import G2PDiffusion
from g2p.models.vae import decode


class Generator:
    """Guided sampling from a trained :class:`G2PDiffusion`."""

    def __init__(self, model: G2PDiffusion) -> None:
        self.model = model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: G2PConfig | None = None,
                        device: str | torch.device = "cpu") -> "Generator":
        """Load ``path`` (a :meth:`G2PDiffusion.save_pretrained` folder); with ``cfg``, check its architecture."""
        return cls(G2PDiffusion.from_pretrained(path, cfg=cfg, device=device))

    @property
    def cfg(self) -> G2PConfig:
        return self.model.cfg

    @torch.no_grad()
    def generate(
        self,
        barcodes: Sequence[str],
        latitudes: Sequence[float | None],
        longitudes: Sequence[float | None],
        n: int = 4,
        steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        batch_size: int = 64,
    ) -> Tensor:
        """``n`` images for each (barcode, place): uint8 (B, n, 3, H, W).

        ``None`` knobs take the checkpoint's ``sampling`` section. A place of
        ``None`` is unknown (the conditioner's unknown-place token). Bad input
        raises ``ValueError`` naming the field and value.
        """
        if not (len(barcodes) == len(latitudes) == len(longitudes)):
            raise ValueError(f"barcodes, latitudes, longitudes: lengths differ "
                             f"({len(barcodes)}, {len(latitudes)}, {len(longitudes)})")
        if n < 1:
            raise ValueError(f"n: {n!r} must be at least 1")
        s = self.cfg.sampling
        steps = s.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps: {steps!r} must be at least 1")
        w = s.guidance_scale if guidance_scale is None else guidance_scale
        cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        seqs = [check_barcode(b, field=f"barcodes[{i}]") for i, b in enumerate(barcodes)]
        places = [check_coordinates(la, lo) for la, lo in zip(latitudes, longitudes)]

        m = self.model
        sampling = s if scheduler is None else dataclasses.replace(s, scheduler=scheduler)
        sched = build_sampling_scheduler(m.cfg.diffusion, sampling)
        cond_fn = make_aligner_cond_fn(m.aligner, m.negative_bank.to(m.device)) if w != 0 else None
        gen = torch.Generator().manual_seed(seed)
        per = max(1, batch_size // n)  # conditions per sampler call
        out = []
        for i in range(0, len(seqs), per):
            chunk = slice(i, i + per)
            lat = torch.tensor([p[0] if p[0] is not None else 0.0 for p in places[chunk]])
            lon = torch.tensor([p[1] if p[1] is not None else 0.0 for p in places[chunk]])
            known = torch.tensor([p[0] is not None for p in places[chunk]])
            cond = m.condition(seqs[chunk], lat, lon, known)
            z = sample_latents(
                m.denoiser, sched, cond.context, cond.context_mask, cond.pooled,
                latent_shape=m.latent_shape, num_inference_steps=steps, num_samples=n,
                cfg_scale=cfg_scale, guidance_scale=w, cond_fn=cond_fn, generator=gen,
            )  # (b * n, C, h, w)
            x = decode(m.vae, z)  # (b * n, 3, H, W)
            out.append(to_uint8(x).cpu().view(-1, n, *x.shape[1:]))
        return torch.cat(out)


def to_pil(image: Tensor) -> Image.Image:
    """uint8 (3, H, W) -> PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def grid(images: Tensor, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 (N, 3, H, W) -> one PIL grid image (white gutters)."""
    n, _, h, w = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = images[i].permute(1, 2, 0).numpy()
    return Image.fromarray(canvas)


def save_grid(images: Tensor, path: str | Path, ncols: int | None = None) -> Path:
    """Write uint8 (N, 3, H, W) as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, ncols).save(path)
    return path
