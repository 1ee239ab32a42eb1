"""Where images become numbers: the judge and the trait reader grade a batch of barcodes' rows.

Runs where the images are (an evaluation actor); what leaves is per-barcode
summaries, a few floats per image, which the pure-numpy metrics
(:mod:`g2p.evaluation.metrics`) turn into the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from g2p.evaluation.metrics import species_hits


def grade_rows(judge: Any, reader: Any, images: dict[str, Tensor], barcodes: Sequence[str], species: np.ndarray,
               names: np.ndarray, protos: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per row, for B barcodes and their row images uint8 (B, K, 3, H, W):

    - ``scores`` (B, K): CLIBDScore of each image against its barcode;
    - ``hits`` (B, K): 1.0 where the image's closest species prototype (``names``,
      ``protos``) is the barcode's species;
    - ``traits`` (with a ``reader``): the reading of each barcode's first image, {trait: (B,)}.
    """
    with torch.no_grad():
        bc = judge.embed_barcodes(list(barcodes))  # (B, D)
        out: dict[str, dict[str, Any]] = {}
        for row, ims in images.items():
            b, k = ims.shape[:2]
            emb = judge.embed_images(ims.reshape(b * k, *ims.shape[2:])).reshape(b, k, -1)
            hits = species_hits(emb.reshape(b * k, -1).numpy(), np.repeat(species, k), names, protos)
            out[row] = {"scores": (emb * bc[:, None, :]).sum(-1).numpy().astype(np.float64),
                        "hits": hits.reshape(b, k)}
            if reader is not None:
                out[row]["traits"] = reader.predict(ims[:, 0])
    return out


def pair_scores(judge: Any, images: Tensor, true_barcodes: Sequence[str],
                shuffled_barcodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each image with its own barcode and with its shuffled partner's (the threshold's pairs)."""
    with torch.no_grad():
        emb = judge.embed_images(images)
        t = (emb * judge.embed_barcodes(list(true_barcodes))).sum(-1).numpy()
        s = (emb * judge.embed_barcodes(list(shuffled_barcodes))).sum(-1).numpy()
    return t.astype(np.float64), s.astype(np.float64)
