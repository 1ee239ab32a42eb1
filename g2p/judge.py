"""The judge: a CLIBD-style image-DNA contrastive model that grades generated images.

The paper grades its samples with CLIBD (bioscan-ml/clibd): an image tower and
a BarcodeBERT DNA tower, embeddings L2-normalised into one space, trained with
a symmetric InfoNCE loss at a learnable temperature. CLIBDScore of an
(image, barcode) pair is the cosine of their embeddings. This module is our
own small version, trained as the ``train_judge`` stage on the training split
plus the unseen species' reference records (``key_unseen``; never their val or
test records), in batches of same-genus species (:mod:`g2p.train.judge`).

It shares no weights, code path or checkpoint with the aligner (which guides
sampling), so the generator is never graded by its own guide: the DNA tower
has its own k-mer tokenizer instance (k = 5, non-overlapping, as CLIBD) and its
own transformer, the image tower reads pixels (the aligner reads noisy latents).

Towers::

    images uint8 (N, 3, H, W) -> resize to cfg.image_size -> [-1, 1]
        -> ConvTower (stride-2 conv levels, GroupNorm, GELU) -> mean pool -> Linear -> L2 norm  (N, D)
    barcodes -> KmerTokenizer(k, stride=k) -> token + position embeddings
        -> TransformerEncoder -> masked mean over k-mer tokens -> Linear -> L2 norm             (N, D)
    score = <image_embedding, barcode_embedding>                                                (N,)

Plugging in real CLIBD weights: evaluation, serving and the registry only call
:class:`ImageDNAJudge`'s three methods (``embed_images``, ``embed_barcodes``,
``score``), never this class's internals. Wrap the released CLIBD model in a
class with those methods (``embed_images``: resize the uint8 images to 224,
normalise as its ViT-B/16 expects, run its image encoder and L2-normalise;
``embed_barcodes``: pad each barcode to 660 nt with N, tokenise with its
BarcodeBERT k = 5 tokenizer, run its DNA encoder and L2-normalise; ``score``:
the row-wise dot product) and pass that object wherever a ``Judge`` goes (e.g.
``pipelines.registry`` / ``g2p serve --judge-dir`` load this class from a
folder, so give it ``from_pretrained(dir)`` too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from g2p.config import JudgeConfig, _build
from g2p.tokenizer import PAD_ID, KmerTokenizer, max_tokens

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge_config.json"


@runtime_checkable
class ImageDNAJudge(Protocol):
    """What evaluation and serving need from a judge (ours, or a wrapped CLIBD)."""

    def embed_images(self, images: Tensor) -> Tensor: ...

    def embed_barcodes(self, barcodes: Sequence[str], latitudes: Sequence[float | None] | None = None,
                       longitudes: Sequence[float | None] | None = None) -> Tensor: ...

    def score(self, images: Tensor, barcodes: Sequence[str]) -> Tensor: ...


# ----------------------------------------------------------------------------
# towers
# ----------------------------------------------------------------------------


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ConvTower(nn.Module):
    """A small CNN: a stride-2 stem, then per level a stride-2 conv and a conv (GroupNorm + GELU).

    (B, 3, S, S) -> (B, channels[-1], S / 2^(1 + len(channels)), ...).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        # a stride-2 stem: full-resolution convolutions cost most and see only pixel noise
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=2, padding=1),
                                   nn.GroupNorm(_groups(channels[0]), channels[0]), nn.GELU()]
        c_in = channels[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.GELU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.GELU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) in [-1, 1] -> (B, C, S / 2^(L+1), ...)
        return self.net(x)


class DNATower(nn.Module):
    """BarcodeBERT-style encoder over non-overlapping k-mers: embeddings, transformer, masked mean.

    With ``dna_layers = 0`` it is a bag of k-mers (the mean of their
    embeddings; the position embeddings then add a near-constant), the
    cheapest DNA tower, and one that degrades gracefully on unseen species:
    their barcodes share most k-mers with their genus.
    """

    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        h = cfg.dna_hidden_size
        self.token = nn.Embedding(5 + 4 ** cfg.k, h, padding_idx=PAD_ID)
        self.position = nn.Embedding(max_tokens(cfg.k, cfg.k, cfg.max_nucleotides), h)
        layer = nn.TransformerEncoderLayer(h, cfg.dna_heads, cfg.dna_intermediate_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = (nn.TransformerEncoder(layer, cfg.dna_layers, enable_nested_tensor=False)
                        if cfg.dna_layers > 0 else None)
        self.norm = nn.LayerNorm(h)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:  # (B, L), (B, L) -> (B, h)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.token(ids) + self.position(pos)[None]  # (B, L, h)
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~mask.bool())
        x = self.norm(x)
        w = mask.float()
        w[:, 0] = 0.0  # the tokenizer's [ENV] slot: this judge reads DNA only
        return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


# ----------------------------------------------------------------------------
# the judge
# ----------------------------------------------------------------------------


class Judge(nn.Module):
    """CLIP-style image-DNA model; see the module docstring. ``score`` is our CLIBDScore."""

    def __init__(self, cfg: JudgeConfig = JudgeConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = KmerTokenizer(k=cfg.k, stride=cfg.k, max_nucleotides=cfg.max_nucleotides)
        self.image_tower = ConvTower(cfg.channels)
        self.image_proj = nn.Linear(self.image_tower.out_channels, cfg.embed_dim)
        self.dna_tower = DNATower(cfg)
        h = cfg.dna_hidden_size
        self.dna_proj = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp())

    # -- inputs ----------------------------------------------------------------
    def prepare_images(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W), any H = W -> float (N, 3, S, S) in [-1, 1] at ``cfg.image_size``."""
        check_images(images)
        x = images.to(self.device).float().div(127.5).sub(1.0)
        if x.shape[-1] != self.cfg.image_size:
            x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def tokenize(self, barcodes: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask (N, L) of the judge's own k-mer tokenizer."""
        check_barcodes(barcodes)
        ids, mask = self.tokenizer.encode_batch_numpy(list(barcodes))
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # -- embeddings (differentiable; the public methods below run without grad) --
    def image_features(self, x: Tensor) -> Tensor:  # (N, 3, S, S) in [-1, 1] -> (N, D), unit norm
        return F.normalize(self.image_proj(self.image_tower(x).mean(dim=(2, 3))), dim=-1)

    def dna_features(self, ids: Tensor, mask: Tensor) -> Tensor:  # (N, L) -> (N, D), unit norm
        return F.normalize(self.dna_proj(self.dna_tower(ids, mask)), dim=-1)

    def forward(self, x: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Symmetric InfoNCE (CLIP) of a batch of matching (image, barcode) pairs."""
        return clip_loss(self.image_features(x), self.dna_features(ids, mask), self.logit_scale)

    @torch.no_grad()
    def embed_images(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """uint8 (N, 3, H, W) -> float (N, D), L2-normalised (cpu)."""
        was = self.training
        self.eval()
        out = [self.image_features(self.prepare_images(images[i:i + batch_size])).cpu()
               for i in range(0, len(images), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.empty(0, self.cfg.embed_dim)

    @torch.no_grad()
    def embed_barcodes(self, barcodes: Sequence[str], latitudes: Sequence[float | None] | None = None,
                       longitudes: Sequence[float | None] | None = None, batch_size: int = 256) -> Tensor:
        """Barcodes -> float (N, D), L2-normalised (cpu). Places are accepted and ignored (DNA only, as CLIBD)."""
        check_barcodes(barcodes)
        for name, v in (("latitudes", latitudes), ("longitudes", longitudes)):
            if v is not None and len(v) != len(barcodes):
                raise ValueError(f"{name}: {len(v)} values for {len(barcodes)} barcodes")
        was = self.training
        self.eval()
        out = [self.dna_features(*self.tokenize(barcodes[i:i + batch_size])).cpu()
               for i in range(0, len(barcodes), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.empty(0, self.cfg.embed_dim)

    def score(self, images: Tensor, barcodes: Sequence[str]) -> Tensor:
        """CLIBDScore of each (image i, barcode i): cosine in [-1, 1], shape (N,)."""
        if len(images) != len(barcodes):
            raise ValueError(f"images: {len(images)} images for {len(barcodes)} barcodes")
        return (self.embed_images(images) * self.embed_barcodes(barcodes)).sum(-1)

    # -- persistence (safetensors + JSON config) ---------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(_plain(self.cfg), indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(d / WEIGHTS_NAME), metadata={"component": "judge",
                                                            "judge_config": json.dumps(_plain(self.cfg))})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Judge":
        d = Path(directory)
        if not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"directory: {d} holds no {WEIGHTS_NAME} (not a Judge.save_pretrained folder)")
        cfg = _build(JudgeConfig, json.loads((d / CONFIG_NAME).read_text()), "judge")
        judge = cls(cfg)
        judge.load_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=True)
        return judge.to(device).eval()


def clip_loss(img: Tensor, dna: Tensor, logit_scale: Tensor, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a (B, D) x (B, D) batch of unit vectors.

    ``labels`` (B,) int, optional: pairs with equal labels (same species) are
    all positives (a multi-positive target, row-normalised), so two images of
    one species are not pushed apart as negatives.
    """
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * img @ dna.T  # (B, B)
    if labels is None:
        target = torch.eye(len(img), device=img.device)
    else:
        target = (labels[:, None] == labels[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    loss_i = -(target * logits.log_softmax(1)).sum(1).mean()
    loss_d = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_d)


# ----------------------------------------------------------------------------
# input checks (a clear error naming the field and the value)
# ----------------------------------------------------------------------------


def check_images(images: Tensor) -> None:
    if not torch.is_tensor(images):
        raise TypeError(f"images: expected a uint8 tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected dtype uint8 (0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] < 8:
        raise ValueError(f"images: expected shape (N, 3, H, W) with H = W >= 8, got {tuple(images.shape)}")


def check_barcodes(barcodes: Sequence[str]) -> None:
    if isinstance(barcodes, str) or not isinstance(barcodes, Sequence):
        raise TypeError(f"barcodes: expected a list of strings, got {type(barcodes).__name__}")
    for i, b in enumerate(barcodes):
        if not isinstance(b, str) or not b.strip():
            raise ValueError(f"barcodes[{i}]: expected a non-empty DNA string, got {b!r}")


def _plain(cfg: JudgeConfig) -> dict:
    import dataclasses

    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v
            for f in dataclasses.fields(cfg)}


def species_retrieval(image_emb: Tensor, query_species: Sequence[str], key_emb: Tensor,
                      key_species: Sequence[str]) -> dict[str, float]:
    """Species-level image-to-DNA retrieval (top-1 / top-5 accuracy).

    Keys are averaged per species: one embedding per species (the mean of its
    barcodes' unit embeddings, re-normalised); a query image is right when the
    closest species embedding is its own species. Queries whose species has no
    key are an error (they could never be right).
    """
    names = sorted(set(map(str, key_species)))
    index = {s: i for i, s in enumerate(names)}
    ks = torch.as_tensor([index[str(s)] for s in key_species])
    centroids = torch.zeros(len(names), key_emb.shape[1]).index_add_(0, ks, key_emb.float())
    centroids = F.normalize(centroids, dim=-1)  # (S, D)
    missing = sorted({str(s) for s in query_species} - set(index))
    if missing:
        raise ValueError(f"query_species: {len(missing)} species have no key barcode, e.g. {missing[0]!r}")
    truth = torch.as_tensor([index[str(s)] for s in query_species])
    sims = image_emb.float() @ centroids.T  # (Q, S)
    rank = (sims > sims.gather(1, truth[:, None])).sum(1)  # 0 = top-1
    return {"top1": float((rank < 1).float().mean()), "top5": float((rank < 5).float().mean()),
            "num_queries": float(len(truth)), "num_species": float(len(names)),
            "chance": 1.0 / len(names)}
