"""Training the grading models: the judge (``train_judge``) and the trait reader (``train_trait_reader``).

Both are ordinary :func:`g2p.train.loop.fit` stages, kept apart from
:mod:`g2p.train.stages` on purpose: the judge must share no code path with the
aligner it grades. Like the generator's stages they take ``rank``/``world_size``
(each rank trains on its slice of every epoch) and ``wrap`` (DDP from the Ray
adapter), and resume from a ``FitState.state_dict()``.

Augmentation (:func:`augment`) is what makes the graders usable on generated
images: a sampler's output is never pixel-identical to a photo, so the
towers see shifted, slightly blurred and (judge only) brightness/contrast
jittered copies of the real images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from g2p.config import DataConfig, TrainConfig
from g2p.data.dataset import Arrays, epoch_batches
from g2p.judge import Judge
from g2p.train.loop import FitState, Hooks, cycle, fit
from g2p.trait_reader import TraitReader

Wrap = Callable[[nn.Module], nn.Module]


def _identity(module: nn.Module) -> nn.Module:
    return module


def _batches(n: int, cfg: TrainConfig, rank: int, world_size: int, resume: dict | None) -> Iterator[np.ndarray]:
    per_rank = max(1, cfg.batch_size // world_size)  # global batch = cfg.batch_size
    it = cycle(lambda epoch: epoch_batches(n, per_rank, cfg.seed, epoch, rank, world_size))
    for _ in range(int(resume["step"]) if resume else 0):  # past the batches already trained on
        next(it)
    return it


def augment(x: Tensor, g: torch.Generator, *, shift: float, color: float, blur: float) -> Tensor:
    """Random shift (edge-padded), brightness/contrast jitter and, with probability ``blur``, a
    resampling through a lower resolution, of (B, 3, S, S) in [-1, 1]."""
    b, _, s, _ = x.shape
    if shift > 0:
        p = max(1, int(round(shift * s)))
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dx, dy = torch.randint(0, 2 * p + 1, (2, b), generator=g)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])
    if color > 0:
        gain = 1 + color * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
        bias = color * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + bias).clamp(-1, 1)
    if blur > 0:
        # resampled through a random lower resolution (50-90% of the side): the softness of a VAE decode
        low = max(4, int(round(s * (0.5 + 0.4 * float(torch.rand((), generator=g))))))
        blurred = F.interpolate(F.interpolate(x, size=low, mode="bilinear", antialias=True), size=s,
                                mode="bilinear", align_corners=False)
        pick = (torch.rand(b, 1, 1, 1, generator=g) < blur).to(x)
        x = pick * blurred + (1 - pick) * x
    return x


def species_labels(species: np.ndarray) -> Tensor:
    """Integer label per record ('' = unlabelled gets a label of its own, never shared)."""
    names = sorted({str(s) for s in species if str(s)})
    index = {s: i for i, s in enumerate(names)}
    return torch.as_tensor([index[str(s)] if str(s) else len(names) + i for i, s in enumerate(species)])


def train_judge(judge: Judge, data: Arrays, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1,
                hooks: Hooks | None = None, resume: dict | None = None, progress: bool = True,
                until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Symmetric InfoNCE between augmented images and their barcodes (species-mates are positives)."""
    if data.images is None:
        raise ValueError("data.images: the judge trains on images, got an Arrays without images")
    jc = judge.cfg
    g = torch.Generator().manual_seed(cfg.seed * 1009 + rank)
    ids_all, mask_all = judge.tokenize(data.barcode)  # (N, L) once: the tokenizer is not in the step
    images = judge.prepare_images(data.images)  # (N, 3, S, S) in [-1, 1]
    labels = species_labels(data.species)
    objective = wrap(_JudgeObjective(judge))
    batches = _batches(len(data), cfg, rank, world_size, resume)
    judge.train()

    def step(idx: np.ndarray, _: int) -> dict[str, Any]:
        t = torch.as_tensor(idx)
        x = augment(images[t].cpu(), g, shift=jc.aug_shift, color=jc.aug_color, blur=jc.aug_blur).to(judge.device)
        lab = labels[t].to(judge.device) if jc.species_positives else None
        loss = objective(x, ids_all[t], mask_all[t], lab)
        return {"loss": loss, "temperature": judge.temperature, "batch_size": len(idx)}

    state = fit(step, list(judge.parameters()), batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_judge", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    judge.eval()
    return state


class _JudgeObjective(nn.Module):
    """The judge's loss as ``forward`` (what DDP wraps)."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge

    def forward(self, x: Tensor, ids: Tensor, mask: Tensor, labels: Tensor | None) -> Tensor:
        from g2p.judge import clip_loss

        j = self.judge
        return clip_loss(j.image_features(x), j.dna_features(ids, mask), j.logit_scale, labels)


def train_trait_reader(reader: TraitReader, images: Tensor, targets: Mapping[str, np.ndarray], cfg: TrainConfig, *,
                       rank: int = 0, world_size: int = 1, hooks: Hooks | None = None,
                       resume: dict | None = None, progress: bool = True, until: int | None = None,
                       wrap: Wrap = _identity) -> FitState:
    """Regress the standardised traits (hues as cos/sin, categoricals as classes) of uint8 ``images``.

    ``targets`` maps every name of :attr:`TraitReader.TARGETS` to an (N,) array
    in the ground truth's units. Standardisation statistics are fitted here
    (unless resuming) and saved with the reader.
    """
    missing = [t for t in reader.TARGETS if t not in targets]
    if missing:
        raise ValueError(f"targets: missing {missing[:3]} (the reader predicts {list(reader.TARGETS)})")
    rc = reader.cfg
    if resume is None:
        reader.fit_normalisation(targets)
    encoded = reader.encode_targets(targets)  # dict of tensors: regression (N, R), class ids per head
    if len(images) != len(encoded["regression"]):
        raise ValueError(f"images: {len(images)} images for {len(encoded['regression'])} target rows")
    g = torch.Generator().manual_seed(cfg.seed * 1009 + rank)
    objective = wrap(_TraitObjective(reader))
    batches = _batches(len(images), cfg, rank, world_size, resume)
    reader.train()

    def step(idx: np.ndarray, _: int) -> dict[str, Any]:
        t = torch.as_tensor(idx)
        x = reader.prepare_images(images[t]).cpu()  # uint8 kept, float per batch: 4x less memory
        x = augment(x, g, shift=rc.aug_shift, color=0.0, blur=rc.aug_blur).to(reader.device)
        batch = {k: v[t].to(reader.device) for k, v in encoded.items()}
        loss, reg, cls = objective(x, batch)
        return {"loss": loss, "regression_loss": reg, "class_loss": cls, "batch_size": len(idx)}

    state = fit(step, list(reader.parameters()), batches, cfg, hooks=hooks, resume=resume, progress=progress,
                desc="train_trait_reader", until=until)
    if state.ema is not None:
        state.ema.copy_to_params()
    reader.eval()
    return state


def with_prior_renders(images: Tensor, targets: Mapping[str, np.ndarray], n: int, data_cfg: DataConfig,
                       seed: int, *, progress: bool = False) -> tuple[Tensor, dict[str, np.ndarray]]:
    """The trait reader's training set: the real uint8 ``images`` and their ``targets``, then ``n`` renders
    of fresh species from the benchmark's prior (:func:`g2p.data.prior.prior_set`, ``data_cfg`` is the
    benchmark's data config, ``seed`` picks the worlds) at the real images' size, with their targets.

    Why: trained on the training species alone the reader partly recognises
    species instead of reading traits; prior renders are distributed like a
    benchmark image of a species never seen before.
    """
    from g2p.data.prior import prior_set
    from g2p.trait_reader import targets_from_parameters

    if n < 0:
        raise ValueError(f"n: the number of prior renders must be >= 0, got {n}")
    size = int(images.shape[-1]) if images.ndim == 4 else 0
    if size < 1:
        raise ValueError(f"images: expected uint8 (N, 3, S, S), got shape {tuple(images.shape)}")
    real = {k: np.asarray(v, dtype=np.float64) for k, v in targets.items()}
    if n == 0:
        return images, real
    prior_images, params = prior_set(data_cfg, n, seed, size, progress=progress)
    prior = targets_from_parameters(params)
    missing = [k for k in prior if k not in real]
    if missing:
        raise ValueError(f"targets: missing {missing[:3]} (the prior renders carry {list(prior)})")
    return torch.cat([images, prior_images]), {k: np.concatenate([real[k], prior[k]]) for k in prior}


class _TraitObjective(nn.Module):
    def __init__(self, reader: TraitReader) -> None:
        super().__init__()
        self.reader = reader

    def forward(self, x: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.reader.loss(x, batch)
