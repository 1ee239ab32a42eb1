"""Images out of the pipeline: uint8 tensors -> PIL images, PNG bytes and grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """uint8 (3, H, W) -> PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def png_bytes(image: Tensor) -> bytes:
    """uint8 (3, H, W) -> PNG bytes (the same pixels give the same bytes)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


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
