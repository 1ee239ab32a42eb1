"""Helpers for tests and benchmarks of the servers: tiny model folders (both layouts), a free port, waiting for HTTP."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path


def tiny_model(path: str | Path, seed: int = 0, image_size: int | None = None) -> Path:
    """An untrained tiny-preset generator saved at ``path`` in the training layout (``config.json`` +
    ``denoiser.safetensors``; ``load_pipeline`` converts it): noise images, real shapes and code paths."""
    import torch

    from g2p.config import preset
    from g2p.model import G2PDiffusion

    cfg = preset("tiny")
    if image_size is not None:
        cfg = cfg.set("vae.image_size", image_size)
    torch.manual_seed(seed)
    return G2PDiffusion(cfg).save_pretrained(path)


def tiny_pipeline(path: str | Path, seed: int = 0, image_size: int | None = None) -> Path:
    """The same untrained tiny model as :func:`tiny_model`, saved in the pipeline layout (``model_index.json``)."""
    import tempfile

    from g2p.pipeline import G2PDiffusionPipeline, load_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tiny_model(Path(tmp) / "model", seed=seed, image_size=image_size)
        pipe = load_pipeline(str(Path(tmp) / "model"))
    assert isinstance(pipe, G2PDiffusionPipeline)
    pipe.save_pretrained(str(path))
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, ok=(200,), proc=None, log=None) -> None:
    """Poll ``url`` until it answers one of ``ok``; raise ``TimeoutError`` naming the URL.

    With ``proc`` (the server's ``Popen``), stop as soon as it has exited, with
    the end of its ``log`` file in the error.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}) before answering\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status in ok:
                    return
                last = r.status
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout:.0f} s (last: {last!r})")


def tiny_records(root: str | Path, barcodes: list[str]) -> Path:
    """A small ``valid.parquet`` of test records (with real JPEGs in the BIOSCAN-5M layout) under ``root``."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from g2p.data.layout import image_relpath

    root = Path(root)
    rows = []
    for i, bc in enumerate(barcodes):
        pid = f"TEST{i:03d}-26"
        path = root / image_relpath(pid, "test", "")
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[16:48, 16:48] = (200, 120 + 40 * i, 40)
        Image.fromarray(rgb).save(path)
        rows.append({"processid": pid, "species": f"Testus species{i}", "dna_barcode": bc,
                     "coord-lat": 10.0 * i, "coord-lon": -20.0, "split": "test", "chunk": None})
    out = root / "valid.parquet"
    pd.DataFrame(rows).to_parquet(out)
    return out
