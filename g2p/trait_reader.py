"""The trait reader: the benchmark's gold standard for generated images.

On the synthetic benchmark every barcode's species has known phenotype
parameters (``trait_*`` columns of ``synthetic_ground_truth.parquet``, see
:mod:`g2p.data.traits`) and every record a drawn body size
(``trait_size_base * size_multiplier``, Bergmann's rule). This CNN is trained
to read them back from an image, so a generated image can be scored trait by
trait against its barcode's true species traits. It learns from the training
split's images and from renders of fresh species drawn from the benchmark's
prior (:mod:`g2p.data.prior`, ``TraitReaderConfig.prior_renders``): trained on
the training species alone it partly recognises species instead of reading
traits, and its error on unseen species is many times that on seen ones.

Targets and how they are learnt:

- hues (``body_hue``, ``pattern_hue``, ``wing_hue``, in turns, circular):
  regress (cos, sin) of the angle; read back with atan2; errors are circular
  distances in turns (at most 0.5);
- categoricals (``pattern_kind`` 0..2, ``wing_type`` index into
  ``traits.WING_TYPES``, ``antenna_club`` 0/1): a classification head each;
  read back as the argmax class; errors are 0/1 (report accuracy);
- everything else, ``body_size`` and ``pattern_count`` included: standardised
  regression (mean/std fitted on the training targets and saved with the
  weights); errors are absolute, in the ground truth's units.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from g2p.config import TraitReaderConfig, _build
from g2p.data.traits import TRAIT_NAMES, WING_TYPES
from g2p.judge import ConvTower, check_images

WEIGHTS_NAME = "trait_reader.safetensors"
CONFIG_NAME = "trait_reader_config.json"

CIRCULAR: tuple[str, ...] = ("body_hue", "pattern_hue", "wing_hue")
CATEGORICAL: dict[str, int] = {"pattern_kind": 3, "wing_type": len(WING_TYPES), "antenna_club": 2}
# size_base alone is not visible (only base x multiplier is drawn): body_size replaces it
CONTINUOUS: tuple[str, ...] = tuple(n for n in TRAIT_NAMES if n not in CIRCULAR and n not in CATEGORICAL
                                    and n != "size_base") + ("body_size",)


# What a biologist reads off an insect, each trait in one group (body_size: the drawn size, latitude included).
TRAIT_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("body_hue", "body_light", "body_sat", "pattern_hue", "pattern_light", "wing_hue"),
    "pattern": ("pattern_kind", "pattern_count"),
    "shape": ("wing_type", "wing_length", "wing_width", "wing_angle", "head_size", "thorax_size", "abdomen_length",
              "abdomen_width", "waist", "leg_length", "antenna_length", "antenna_club"),
    "size": ("body_size",),
}


def genus_oracle(truth: pd.DataFrame, processids: Sequence[str]) -> dict[str, np.ndarray]:
    """The traits a reader of the genus alone would give: for each record, the mean of the *training*
    records' true traits in its genus (circular mean for hues, the most common class for categoricals,
    the plain mean otherwise). ``truth``: the synthetic ground truth indexed by processid (``split``,
    ``genus_id`` and the ``trait_*`` columns). A genus with no training record gets the training mean."""
    train = truth[truth["split"] == "train"]
    if train.empty:
        raise ValueError("truth: no 'train' records to take genus means from")
    tt = targets_from_ground_truth(train)
    genus = train["genus_id"].to_numpy()

    def summary(idx: np.ndarray) -> dict[str, float]:
        out = {}
        for n, v in tt.items():
            x = v[idx]
            if n in CIRCULAR:
                a = 2 * np.pi * x
                out[n] = float(np.mod(np.arctan2(np.sin(a).mean(), np.cos(a).mean()) / (2 * np.pi), 1.0))
            elif n in CATEGORICAL:
                vals, counts = np.unique(np.rint(x), return_counts=True)
                out[n] = float(vals[np.argmax(counts)])
            else:
                out[n] = float(x.mean())
        return out

    overall = summary(np.arange(len(train)))
    by_genus = {g: summary(np.nonzero(genus == g)[0]) for g in np.unique(genus)}
    rows = truth.loc[[str(p) for p in processids], "genus_id"].to_numpy()
    return {n: np.array([by_genus.get(g, overall)[n] for g in rows], dtype=np.float64) for n in tt}


def targets_from_ground_truth(gt: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every target of :attr:`TraitReader.TARGETS` from ground-truth rows (ground-truth units)."""
    out = {n: gt[f"trait_{n}"].to_numpy(dtype=np.float64) for n in TRAIT_NAMES if n != "size_base"}
    out["body_size"] = (gt["trait_size_base"] * gt["size_multiplier"]).to_numpy(dtype=np.float64)
    return out


def targets_from_parameters(p: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every target of :attr:`TraitReader.TARGETS` from drawing parameters (``g2p.data.prior`` records).

    The same numbers the ground truth would hold for a benchmark record drawn
    from them: traits and ``size_mult`` stored as float32, as
    ``synthetic_ground_truth.parquet`` stores them, so a prior render's target
    equals :func:`targets_from_ground_truth` of the same record.
    """
    missing = [k for k in (*TRAIT_NAMES, "size_mult") if k not in p]
    if missing:
        raise ValueError(f"p: drawing parameters lack {missing[:3]} (need every trait and size_mult)")
    f32 = {k: np.asarray(p[k], dtype=np.float32).astype(np.float64) for k in (*TRAIT_NAMES, "size_mult")}
    out = {n: f32[n] for n in TRAIT_NAMES if n != "size_base"}
    out["body_size"] = f32["size_base"] * f32["size_mult"]
    return out


def trait_errors(pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-record error of each trait: circular distance in turns (hues), 0/1 (categoricals), |diff| (others)."""
    out = {}
    for name in TraitReader.TARGETS:
        p, t = np.asarray(pred[name], dtype=np.float64), np.asarray(truth[name], dtype=np.float64)
        if p.shape != t.shape:
            raise ValueError(f"{name}: {p.shape} predictions for {t.shape} true values")
        if name in CIRCULAR:
            d = np.abs(np.mod(p - t, 1.0))
            out[name] = np.minimum(d, 1.0 - d)
        elif name in CATEGORICAL:
            out[name] = (np.rint(p) != np.rint(t)).astype(np.float64)
        else:
            out[name] = np.abs(p - t)
    return out


class TraitReader(nn.Module):
    """CNN image -> traits. ``TARGETS``: trait names (``g2p.data.traits``), ``body_size`` last."""

    TARGETS: tuple[str, ...] = tuple(n for n in TRAIT_NAMES if n != "size_base") + ("body_size",)

    def __init__(self, cfg: TraitReaderConfig = TraitReaderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = ConvTower(cfg.channels)
        feat = self.tower.out_channels * cfg.pool * cfg.pool
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(feat, cfg.hidden), nn.GELU())
        self.regress = nn.Linear(cfg.hidden, len(CONTINUOUS) + 2 * len(CIRCULAR))
        self.classify = nn.ModuleDict({n: nn.Linear(cfg.hidden, c) for n, c in CATEGORICAL.items()})
        self.register_buffer("mean", torch.zeros(len(CONTINUOUS)))
        self.register_buffer("std", torch.ones(len(CONTINUOUS)))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def prepare_images(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W), any H = W -> float (N, 3, S, S) in [-1, 1]."""
        check_images(images)
        x = images.to(self.device).float().div(127.5).sub(1.0)
        if x.shape[-1] != self.cfg.image_size:
            x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(N, 3, S, S) in [-1, 1] -> regression outputs (N, R) and class logits per categorical."""
        h = self.trunk(F.adaptive_avg_pool2d(self.tower(x), self.cfg.pool))
        return self.regress(h), {n: head(h) for n, head in self.classify.items()}

    # -- targets ----------------------------------------------------------------
    def fit_normalisation(self, targets: Mapping[str, np.ndarray]) -> None:
        t = torch.as_tensor(np.stack([np.asarray(targets[n], dtype=np.float64) for n in CONTINUOUS], 1),
                            dtype=torch.float32)
        self.mean.copy_(t.mean(0))
        self.std.copy_(t.std(0).clamp_min(1e-6) if len(t) > 1 else torch.ones(len(CONTINUOUS)))

    def encode_targets(self, targets: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
        """``regression`` (N, R): standardised continuous then (cos, sin) per hue; class ids per categorical."""
        cont = torch.as_tensor(np.stack([np.asarray(targets[n], dtype=np.float64) for n in CONTINUOUS], 1),
                               dtype=torch.float32)
        cont = (cont - self.mean.cpu()) / self.std.cpu()
        ang = [2 * math.pi * torch.as_tensor(np.asarray(targets[n], dtype=np.float64), dtype=torch.float32)
               for n in CIRCULAR]
        circ = torch.stack([f(a) for a in ang for f in (torch.cos, torch.sin)], 1)
        out = {"regression": torch.cat([cont, circ], 1)}
        for n, c in CATEGORICAL.items():
            ids = torch.as_tensor(np.rint(np.asarray(targets[n], dtype=np.float64)), dtype=torch.long)
            if len(ids) and (ids.min() < 0 or ids.max() >= c):
                raise ValueError(f"targets[{n!r}]: classes must be in 0..{c - 1}, got {ids.min()}..{ids.max()}")
            out[n] = ids
        return out

    def loss(self, x: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        reg, logits = self(x)
        reg_loss = F.mse_loss(reg, batch["regression"])
        cls_loss = sum(F.cross_entropy(logits[n], batch[n]) for n in CATEGORICAL) / len(CATEGORICAL)
        return reg_loss + cls_loss, reg_loss.detach(), cls_loss.detach()

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """uint8 (N, 3, H, W) -> each target, (N,) float64 in the ground truth's units."""
        was = self.training
        self.eval()
        regs, logits = [], {n: [] for n in CATEGORICAL}
        for i in range(0, len(images), batch_size):
            r, lg = self(self.prepare_images(images[i:i + batch_size]))
            regs.append(r.cpu())
            for n in CATEGORICAL:
                logits[n].append(lg[n].cpu())
        self.train(was)
        reg = torch.cat(regs) if regs else torch.empty(0, len(CONTINUOUS) + 2 * len(CIRCULAR))
        nc = len(CONTINUOUS)
        cont = reg[:, :nc] * self.std.cpu() + self.mean.cpu()
        out = {n: cont[:, i].double().numpy() for i, n in enumerate(CONTINUOUS)}
        for j, n in enumerate(CIRCULAR):
            c, s = reg[:, nc + 2 * j], reg[:, nc + 2 * j + 1]
            out[n] = np.mod(torch.atan2(s, c).double().numpy() / (2 * math.pi), 1.0)
        for n in CATEGORICAL:
            lg = torch.cat(logits[n]) if logits[n] else torch.empty(0, CATEGORICAL[n])
            out[n] = lg.argmax(1).double().numpy()
        return {n: out[n] for n in self.TARGETS}

    # -- persistence --------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        plain = {f.name: list(v) if isinstance(v := getattr(self.cfg, f.name), tuple) else v
                 for f in dataclasses.fields(self.cfg)}
        (d / CONFIG_NAME).write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(d / WEIGHTS_NAME), metadata={"component": "trait_reader",
                                                            "targets": json.dumps(list(self.TARGETS))})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "TraitReader":
        d = Path(directory)
        if not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"directory: {d} holds no {WEIGHTS_NAME} (not a TraitReader folder)")
        cfg = _build(TraitReaderConfig, json.loads((d / CONFIG_NAME).read_text()), "trait_reader")
        reader = cls(cfg)
        reader.load_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=True)
        return reader.to(device).eval()
