"""What the graders' stage measures after training, on held-out ``val`` / ``val_unseen`` records (never
test: the evaluate stage reads test alone): the judge's species-level image-to-DNA retrieval and the trait
reader's error per trait next to a constant guess (see :mod:`pipelines.train_judge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.train_judge import load_split, trait_targets


def judge_metrics(judge: Any, valid: str | Path, root: str | Path) -> dict[str, float]:
    """Species-level retrieval, seen and unseen (see the module docstring)."""
    from g2p.judge import species_retrieval

    size = judge.cfg.image_size
    # held-out val images, never test (test is the evaluate stage's alone); the seen species' keys are their
    # training barcodes, the unseen species' their key_unseen reference barcodes
    test, val = load_split(valid, root, "val", size), load_split(valid, root, "train", None)
    out = {f"seen_{k}": v for k, v in species_retrieval(judge.embed_images(test.images), test.species,
                                                       judge.embed_barcodes(val.barcode), val.species).items()}
    tu, ku = load_split(valid, root, "val_unseen", size), load_split(valid, root, "key_unseen", None)
    q, kemb = judge.embed_images(tu.images), judge.embed_barcodes(ku.barcode)
    out.update({f"unseen_{k}": v for k, v in species_retrieval(q, tu.species, kemb, ku.species).items()})
    # among all species, seen and unseen (evaluate's species accuracy decides among all of them too)
    both, both_species = torch.cat([judge.embed_barcodes(val.barcode), kemb]), list(val.species) + list(ku.species)
    out.update({f"unseen_all_{k}": v for k, v in species_retrieval(q, tu.species, both, both_species).items()})
    out.update({f"seen_all_{k}": v for k, v in species_retrieval(
        judge.embed_images(test.images), test.species, both, both_species).items()})
    # true pairs vs shuffled pairs on real test images: the scale a CLIBDScore lives on
    for prefix, arrays in (("seen", test), ("unseen", tu)):
        img, dna = judge.embed_images(arrays.images), judge.embed_barcodes(arrays.barcode)
        perm = np.random.default_rng(0).permutation(len(arrays))
        out[f"{prefix}_score_true_pairs"] = float((img * dna).sum(-1).mean())
        out[f"{prefix}_score_shuffled_pairs"] = float((img * dna[torch.as_tensor(perm)]).sum(-1).mean())
    # robustness: the same real test images at half resolution (down, then up again: blurred),
    # closer to what a sampler gives than the photos themselves
    half = test.images.shape[-1] // 2
    blurred = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(test.images.float(), size=half, mode="bilinear", antialias=True),
        size=test.images.shape[-1], mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    out.update({f"seen_half_res_{k}": v for k, v in species_retrieval(
        judge.embed_images(blurred), test.species, judge.embed_barcodes(val.barcode), val.species).items()
        if k in ("top1", "top5")})
    out["temperature"] = judge.temperature
    return out


def trait_metrics(reader: Any, train_targets: dict[str, np.ndarray], valid: str | Path, root: str | Path,
                  ground_truth: str | Path) -> dict[str, Any]:
    """Per-trait error on held-out records (``val``) and unseen species (``val_unseen``), with a baseline."""
    from g2p.trait_reader import CATEGORICAL, CIRCULAR, trait_errors

    def constant(name: str, n: int) -> np.ndarray:
        t = train_targets[name]
        if name in CATEGORICAL:
            vals, counts = np.unique(np.rint(t), return_counts=True)
            return np.full(n, vals[counts.argmax()])
        if name in CIRCULAR:
            a = 2 * np.pi * t
            return np.full(n, np.mod(np.arctan2(np.sin(a).mean(), np.cos(a).mean()) / (2 * np.pi), 1.0))
        return np.full(n, t.mean())

    out: dict[str, Any] = {}
    for split in ("val", "val_unseen"):  # held out, never test
        arrays = load_split(valid, root, split, reader.cfg.image_size)
        truth = trait_targets(arrays.processid, ground_truth)
        err = trait_errors(reader.predict(arrays.images), truth)
        base = trait_errors({n: constant(n, len(arrays)) for n in reader.TARGETS}, truth)
        rows = {}
        for n in reader.TARGETS:
            key = "error_rate" if n in CATEGORICAL else "mae"
            rows[n] = {key: float(err[n].mean()), f"{key}_constant_baseline": float(base[n].mean())}
        out[split] = {"num_records": len(arrays), "traits": rows}
    return out


# ----------------------------------------------------------------------------
# the DVC stage
# ----------------------------------------------------------------------------
