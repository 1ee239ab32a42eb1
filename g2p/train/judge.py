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

The judge's batches (:func:`genus_epoch_batches`) are groups of several
species of one genus, so its InfoNCE denominators hold congeners: what tells
an unseen species from its seen relatives, which random batches rarely show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _batches(n: int, cfg: TrainConfig, rank: int, world_size: int, resume: dict | None,
             make_epoch: Callable[[int, int], Iterable[np.ndarray]] | None = None) -> Iterator[np.ndarray]:
    """Endless per-rank index batches; ``make_epoch(epoch, per_rank)`` gives one epoch's (default: the plain
    seeded permutation of ``n``). Deterministic, so resuming skips the ``resume['step']`` batches trained on."""
    per_rank = max(1, cfg.batch_size // world_size)  # global batch = cfg.batch_size
    if make_epoch is None:
        it = cycle(lambda epoch: epoch_batches(n, per_rank, cfg.seed, epoch, rank, world_size))
    else:
        it = cycle(lambda epoch: make_epoch(epoch, per_rank))
    for _ in range(int(resume["step"]) if resume else 0):  # past the batches already trained on
        next(it)
    return it


def genus_groups(species: Sequence[str], genus: Sequence[str], species_per_group: int, records_per_species: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's record groups, every record in exactly one: ``species_per_group`` species of one genus,
    up to ``records_per_species`` records of each, interleaved (a, b, c, a, b, c), so a group cut in two at a
    batch edge still holds two species in each part of two or more records.

    Within a genus the species with the most records left go first (ties at random): species drain
    together, so groups hold 2+ species as long as the genus has 2+ species left. A species of unknown
    genus ('') is a genus of its own; an unlabelled record (species '') is a group of its own.
    """
    if species_per_group < 1 or records_per_species < 1:
        raise ValueError(f"species_per_group, records_per_species: expected >= 1, got {species_per_group}, "
                         f"{records_per_species}")
    sp, ge = np.asarray(species, dtype=object), np.asarray(genus, dtype=object)
    if len(sp) != len(ge):
        raise ValueError(f"genus: {len(ge)} values for {len(sp)} records")
    by_genus: dict[str, dict[str, list[int]]] = {}
    groups: list[np.ndarray] = []
    for i, (s, g) in enumerate(zip(sp.tolist(), ge.tolist())):
        s, g = str(s or ""), str(g or "")
        if not s:
            groups.append(np.array([i]))
            continue
        by_genus.setdefault(g or "\0" + s, {}).setdefault(s, []).append(i)
    for key in sorted(by_genus):
        chunks: dict[str, list[np.ndarray]] = {}
        for s, idx in sorted(by_genus[key].items()):
            perm = rng.permutation(np.asarray(idx))
            chunks[s] = [perm[a:a + records_per_species] for a in range(0, len(perm), records_per_species)]
        while True:
            left = [s for s in chunks if chunks[s]]
            if not left:
                break
            tie = rng.random(len(left))
            pick = sorted(range(len(left)), key=lambda j: (-len(chunks[left[j]]), tie[j]))[:species_per_group]
            parts = [chunks[left[j]].pop() for j in pick]
            groups.append(np.array([p[t] for t in range(max(map(len, parts))) for p in parts if t < len(p)]))
    return groups


def genus_epoch_batches(species: Sequence[str], genus: Sequence[str], batch_size: int, seed: int, epoch: int,
                        rank: int = 0, world_size: int = 1, *, species_per_group: int = 3,
                        records_per_species: int = 2) -> list[np.ndarray]:
    """One epoch's index batches of ``batch_size`` (per rank) made of genus groups (:func:`genus_groups`).

    Why: with random batches a species' genus-mates are rarely in its InfoNCE denominator, so the judge
    learns "looks like the genus" and never to tell congeners apart, which is all that separates an
    unseen species from its seen relatives. The groups, in a seeded order, form one stream of records
    shared by every rank (deterministic in ``(seed, epoch)``); global batch t is the stream's t-th run of
    ``batch_size * world_size`` records and rank r trains on its r-th slice (disjoint shards; the tail
    that fills no global batch waits for the next epoch's shuffle). Fewer records than one global batch:
    one smaller batch per rank, as :func:`g2p.data.dataset.epoch_batches`.
    """
    rng = np.random.default_rng((seed, epoch))
    groups = genus_groups(species, genus, species_per_group, records_per_species, rng)
    stream = np.concatenate([groups[i] for i in rng.permutation(len(groups))]) if groups else np.zeros(0, int)
    rounds = len(stream) // (batch_size * world_size)
    if rounds == 0:
        per = len(stream) // world_size
        return [stream[rank * per:(rank + 1) * per]] if per else []
    return [stream[(t * world_size + rank) * batch_size:(t * world_size + rank + 1) * batch_size]
            for t in range(rounds)]


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


def train_judge(judge: Judge, data: Arrays, cfg: TrainConfig, *, genus: Sequence[str] | None = None,
                rank: int = 0, world_size: int = 1, hooks: Hooks | None = None, resume: dict | None = None,
                progress: bool = True, until: int | None = None, wrap: Wrap = _identity) -> FitState:
    """Symmetric InfoNCE between augmented images and their barcodes (species-mates are positives).

    ``data``: the training records (the pipeline passes the ``train`` split plus ``judge.extra_splits``);
    ``genus``: (N,) each record's genus ('' unknown), needed when ``judge.batch_species_per_genus`` > 0:
    batches are then genus groups (:func:`genus_epoch_batches`), so genus-mates are each other's negatives.
    """
    if data.images is None:
        raise ValueError("data.images: the judge trains on images, got an Arrays without images")
    jc = judge.cfg
    make_epoch = None
    if jc.batch_species_per_genus > 0:
        if genus is None:
            raise ValueError(f"genus: judge.batch_species_per_genus={jc.batch_species_per_genus} builds batches "
                             "from genera; pass each record's genus (or set it to 0 for random batches)")
        if len(genus) != len(data):
            raise ValueError(f"genus: {len(genus)} values for {len(data)} records")
        genera = np.asarray(genus, dtype=object)

        def make_epoch(epoch: int, per_rank: int) -> list[np.ndarray]:
            return genus_epoch_batches(data.species, genera, per_rank, cfg.seed, epoch, rank, world_size,
                                       species_per_group=jc.batch_species_per_genus,
                                       records_per_species=jc.batch_records_per_species)
    g = torch.Generator().manual_seed(cfg.seed * 1009 + rank)
    ids_all, mask_all = judge.tokenize(data.barcode)  # (N, L) once: the tokenizer is not in the step
    images = judge.prepare_images(data.images)  # (N, 3, S, S) in [-1, 1]
    labels = species_labels(data.species)
    objective = wrap(_JudgeObjective(judge))
    batches = _batches(len(data), cfg, rank, world_size, resume, make_epoch)
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
