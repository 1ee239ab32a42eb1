"""One typed configuration for the whole project.

Each section is a frozen dataclass and a top-level key of ``params.yaml``.
Presets (``tiny``, ``default``, ``paper``) are values of :class:`G2PConfig`
(:mod:`g2p.presets`), never separate code paths. Loading is strict: an
unknown key or a value of the wrong type is a :class:`ConfigError` naming the
dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from g2p.variation import LATITUDES, MUTATION_RATES


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


# ----------------------------------------------------------------------------
# Data: the synthetic benchmark and the validation rules
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """The synthetic BIOSCAN-5M-layout benchmark (``g2p data synth``; see ``g2p.data.synth``).

    Size: ``num_orders`` x ``families_per_order`` x ``genera_per_family`` genera,
    each with ``species_per_genus`` seen species (train/val/test),
    ``unseen_species_per_genus`` unseen ones (key/val/test_unseen, placeholder
    names, genus known) and ``heldout_species_per_genus`` ones for
    other_heldout. ``*_per_species`` set records per species and split
    (``train_per_species`` is a mean: train counts vary per species, a long
    tail as in the real data; the evaluation splits are flat).
    ``pretrain_records`` unlabelled records come from the seen and held-out
    species, never from unseen ones.

    Difficulty knobs: ``trait_contrast`` scales how far traits drift per tree
    level below the order (higher: species easier to tell apart; 0: every
    species of an order looks alike); ``nuisance`` scales per-image rotation
    (+-15 deg at 1), offset (+-4%) and lighting (higher: harder; 0: none).
    The ``*_mutation_rate`` values are expected substitutions per site per
    tree level (third codon positions ~2x more, second ~5x less);
    ``individual_mutation_rate`` sets the within-species spread, and the gap
    between it and ``species_mutation_rate`` is the barcode gap.
    ``bergmann_coefficient`` is the relative body-size gain per degree of
    absolute latitude: size = base * (1 + coef * |lat|) (Bergmann's rule;
    0.008: +48% at 60 degrees). ``metadata_only`` writes the CSV and the
    ground truth but no images (the ``large`` preset: BIOSCAN-5M's 5.15 M rows).

    Knobs that make the benchmark no easier than BIOSCAN (0 turns each off):
    ``train_count_spread`` is the log-normal sigma of train records per
    species (a long tail: at 0.8 a twentieth of the species have under a
    quarter of the mean); ``dimorphism`` scales the difference between the
    sexes (each record is female or male at even odds; males at 1: 12%
    smaller bodies, 15% shorter abdomens, 35% longer antennae);
    ``damage_fraction`` is the share of specimens with a lost leg or
    antenna or a torn wing; ``melanism_coefficient`` is thermal melanism, a
    genotype-by-environment effect that differs by clade: in a
    ``melanic_family_fraction`` share of the families body lightness drops by
    that fraction per degree of absolute latitude (0.006: -36% at 60
    degrees), elsewhere it does not depend on the place.
    """

    seed: int = 0
    num_orders: int = 4
    families_per_order: int = 3
    genera_per_family: int = 2
    species_per_genus: int = 3
    unseen_species_per_genus: int = 3  # held-out species (key/val/test_unseen)
    heldout_species_per_genus: int = 0  # placeholder-named species of other_heldout
    train_per_species: int = 40
    val_per_species: int = 4
    test_per_species: int = 6
    key_unseen_per_species: int = 8
    val_unseen_per_species: int = 3
    test_unseen_per_species: int = 4
    other_heldout_per_species: int = 0
    pretrain_records: int = 600  # unlabelled barcodes (and images), pretrain split
    barcode_length: int = 658
    barcode_length_jitter: int = 20  # lengths drawn in [len - j, len + j]
    order_mutation_rate: float = 0.12
    family_mutation_rate: float = 0.08
    genus_mutation_rate: float = 0.05
    species_mutation_rate: float = 0.03
    individual_mutation_rate: float = 0.005
    n_fraction_records: float = 0.05  # share of records carrying some N's
    trait_contrast: float = 1.0
    nuisance: float = 1.0
    bergmann_coefficient: float = 0.008
    train_count_spread: float = 0.8  # log-normal sigma of train records per species
    dimorphism: float = 1.0  # sex differences (0: none)
    damage_fraction: float = 0.1  # specimens missing a leg or an antenna, or with a torn wing
    melanism_coefficient: float = 0.006  # body-lightness loss per degree |lat| in melanic families
    melanic_family_fraction: float = 0.5  # families whose colour follows the climate
    image_size: int = 256
    metadata_only: bool = False  # scale presets: write the CSV, no images

    def __post_init__(self) -> None:
        for name in ("train_count_spread", "dimorphism", "melanism_coefficient"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 10:
                raise ConfigError(f"data.{name}: {v!r} is not a number >= 0")
        for name in ("damage_fraction", "melanic_family_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"data.{name}: {v!r} is not a share between 0 and 1")
        if self.melanism_coefficient * 90 >= 1:
            raise ConfigError(f"data.melanism_coefficient: {self.melanism_coefficient!r} would make bodies "
                              "black or negative by 90 degrees of latitude (need < 1/90)")


@dataclass(frozen=True)
class ValidateConfig:
    """Rules for ``g2p data validate`` (Great Expectations stage).

    ``image_sample``: 0 checks every record's image; N > 0 checks N records
    drawn at random (fixed seed; all when fewer are eligible). A count, not a
    fraction: how well a sample estimates the share of bad images depends on
    how many are checked, not on what share of the data they are, and a count
    bounds the stage's time whatever the data's size. Unchecked records are
    not judged on their images.
    """

    min_length: int = 200  # nt after normalisation
    max_length: int = 660  # reads past this are trimmed, never rejected
    max_n_fraction: float = 0.1
    max_reject_fraction: float = 0.05  # the stage fails above this share
    check_images: bool = True
    image_sample: int = 0  # images to check at random; 0: all

    def __post_init__(self) -> None:
        if isinstance(self.image_sample, bool) or not isinstance(self.image_sample, int) or self.image_sample < 0:
            raise ConfigError(f"validate.image_sample: {self.image_sample!r} is not a count of images "
                              "(0 = check all, N > 0 = check N at random)")


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig:
    k: int = 4
    stride: int = 4  # stride == k: non-overlapping k-mers
    max_nucleotides: int = 660


@dataclass(frozen=True)
class ConditionerConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    env_hidden_size: int = 64
    dropout: float = 0.0
    mlm_probability: float = 0.5  # BarcodeBERT-style masking share
    pool_tokens: int = 0  # >0: average DNA context into this many tokens for cross-attention


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    scaling_factor: float = 1.0  # latents are multiplied by this (SD 1.x: 0.18215); re-estimate after training
    # Local diffusers Stable Diffusion folder ("" = train our own). Its levels, latent channels and
    # scaling factor must match the fields above; its widths, layers and groups are read from it
    # and recorded in the model's config (G2PDiffusion.cfg), which a checkpoint carries.
    pretrained_path: str = ""
    # Training loss (g2p.models.vae.vae_loss): pixels that differ from the light
    # background weigh ``foreground_weight`` times more; KL is a mean per latent element.
    foreground_weight: float = 10.0
    background_threshold: float = 0.1  # max channel distance (in [-1, 1] units) that still counts as background
    kl_weight: float = 1e-4


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    # Local diffusers Stable Diffusion folder ("" = train our own). Its cross_attention_dim must be
    # conditioner.hidden_size; the fields above are then read from it and recorded in the model's
    # config (G2PDiffusion.cfg), which a checkpoint carries.
    pretrained_path: str = ""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: int = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Beyond the paper: also add the pooled condition c (masked mean of the context tokens) to
    # the UNet's timestep embedding through a small MLP whose output starts at zero (diffusers'
    # class_embed_type="projection", as SD-XL adds pooled text). Global traits (colour, size)
    # then reach every ResNet block directly instead of only the cross-attention levels; trained
    # fully with the LoRA matrices. Off in the `paper` preset (the paper's architecture).
    pooled_embedding: bool = True
    # Beyond the paper: finetune the base UNet's own weights too, besides the LoRA matrices
    # (the whole UNet trains in train_diffusion). The paper's base is Stable Diffusion, pretrained
    # on billions of images; ours (the `default` preset) is a small UNet that train_base fits for
    # minutes on the same insects with the null condition only, so its cross-attention has never
    # seen a barcode and rank-8 LoRA on it learns species too slowly: measured side by side at 600
    # steps, judge score 0.47 vs 0.05 and species accuracy 5.6% vs 0% (docs/experiments/README.md).
    # Off in the `paper` and `tiny` presets. With it on, the whole UNet lives in
    # denoiser.safetensors; the lora/ folder alone no longer reproduces the model.
    finetune_base: bool = True
    # The conditioner trains with the UNet in train_diffusion (the paper: eq. 6 updates both).
    # False: it stays as pretrain_conditioner left it (no gradient, no optimiser state), so a
    # diffusion step skips the conditioner's backward pass; docs/experiments/README.md measures it.
    train_conditioner: bool = True


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon"] = "epsilon"
    condition_dropout: float = 0.1  # share of training examples with the null condition
    # Training timesteps: "uniform" over [0, T), or "logit_normal" (Esser et al. 2024):
    # t / T = sigmoid(mean + std * n), n ~ N(0, 1); mean 0 favours mid noise, mean > 0 high noise,
    # where layout and colour are decided (see design/CPU-BUDGET.md).
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    # Loss weight per example: "none" (eq. 6 as written) or "min_snr" (Hang et al., ICCV 2023: an
    # epsilon-prediction example at timestep t weighs min(SNR_t, gamma) / SNR_t, SNR_t = gamma_t / (1 - gamma_t),
    # so the low-noise steps, which are easy, stop dominating the gradient; reported ~3.4x faster convergence).
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0


@dataclass(frozen=True)
class AlignerConfig:
    patch_size: int = 2
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    temperature_init: float = 0.07
    pooling: Literal["cls", "mean"] = "cls"
    symmetric_loss: bool = False  # False: eq. 9 as written (image -> DNA); True: CLIP's two-way InfoNCE


@dataclass(frozen=True)
class JudgeConfig:
    """The CLIBD-style judge (``g2p.judge``): its own towers and tokenizer, never the aligner's.

    Image tower: a CNN with ``channels`` per stride-2 level over images resized
    to ``image_size``; DNA tower: a transformer of ``dna_layers`` layers over
    non-overlapping ``k``-mers (CLIBD: k = 5; 0 layers: a bag of k-mers).
    ``aug_*`` are training augmentations (so the judge does not key on
    pixel-exact textures of real photos): a random shift of up to
    ``aug_shift`` of the side, brightness/contrast jitter of +-``aug_color``,
    a slight blur with probability ``aug_blur``. Species sharing a batch are
    all positives of each other when ``species_positives``.

    Training data: the ``train`` split plus the records of ``extra_splits``
    (default ``key_unseen``: the unseen species' reference images and
    barcodes, which the generator never sees), so the judge knows the species
    it grades at test time instead of rewarding "looks like the genus"; never
    an evaluation split (val, test, val_unseen, test_unseen).
    Batches (``batch_species_per_genus`` > 0): groups of that many species of
    one genus, ``batch_records_per_species`` records each, so every InfoNCE
    denominator holds genus-mates (hard negatives); 0: plain random batches.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    embed_dim: int = 128
    k: int = 5
    max_nucleotides: int = 660
    dna_hidden_size: int = 128
    dna_layers: int = 0  # 0: a bag of k-mers (fast on CPU); CLIBD: 12 transformer layers
    dna_heads: int = 4
    dna_intermediate_size: int = 256
    temperature_init: float = 0.07
    species_positives: bool = True
    aug_shift: float = 0.03
    aug_color: float = 0.05
    aug_blur: float = 0.3
    extra_splits: tuple[str, ...] = ("key_unseen",)
    batch_species_per_genus: int = 3  # 0: plain random batches (no genus groups)
    batch_records_per_species: int = 2

    def __post_init__(self) -> None:
        bad = [s for s in self.extra_splits if s in JUDGE_FORBIDDEN_SPLITS]
        if bad:
            raise ConfigError(f"judge.extra_splits: {bad[0]!r} is a training or evaluation split; the judge "
                              f"may add reference splits only (e.g. key_unseen), never {list(JUDGE_FORBIDDEN_SPLITS)}")
        n = self.batch_species_per_genus
        if isinstance(n, bool) or not (n == 0 or n >= 2):
            raise ConfigError(f"judge.batch_species_per_genus: {self.batch_species_per_genus!r} is not a count of "
                              "species (0 = plain random batches, >= 2 = genus groups)")
        if isinstance(self.batch_records_per_species, bool) or self.batch_records_per_species < 1:
            raise ConfigError(f"judge.batch_records_per_species: {self.batch_records_per_species!r} is not a "
                              "count of records >= 1")


# ``train`` is always the judge's; the rest are where it is measured (never trained on)
JUDGE_FORBIDDEN_SPLITS = ("train", "val", "test", "val_unseen", "test_unseen")


@dataclass(frozen=True)
class TraitReaderConfig:
    """The trait reader (``g2p.trait_reader``): a CNN regressing a synthetic image's species traits.

    ``channels`` per stride-2 level over images resized to ``image_size``; the
    last feature map is pooled to ``pool`` x ``pool`` (so position and extent,
    i.e. body size, survive) and read by an MLP of width ``hidden``. Training
    augmentation: shift up to ``aug_shift`` of the side, blur with probability
    ``aug_blur`` (no colour jitter: colours are traits).

    Training data: the training split's images plus ``prior_renders`` images of
    fresh species drawn from the benchmark's prior (``g2p.data.prior``: new
    taxonomies and trait vectors, drawn and rendered by the synthesiser's own
    functions), so the reader reads the traits of any species instead of
    recognising the training species (0: the training images only).
    """

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    pool: int = 4
    hidden: int = 256
    aug_shift: float = 0.04
    aug_blur: float = 0.3
    prior_renders: int = 8000


# The sampling schedulers ``sampling.scheduler`` names (diffusers classes in g2p.pipeline.SCHEDULERS).
SCHEDULER_NAMES = ("ddim", "ddpm", "dpmsolver++", "unipc", "euler")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling defaults a saved pipeline carries; diffusers' names (``guidance_scale`` is CFG)."""

    # UniPC 10 steps: chosen on val by `python -m benchmarks sampling` (README, "Choosing the sampler")
    scheduler: Literal["ddim", "ddpm", "dpmsolver++", "unipc", "euler"] = "unipc"
    steps: int = 10
    # The default preset's scales were chosen on its trained model with the judge's species
    # accuracy (docs/experiments/README.md); the paper preset keeps w = 1, cfg 3.
    guidance_scale: float = 5.0  # classifier-free guidance (1 = none), as in every diffusers pipeline
    aligner_guidance_scale: float = 5.0  # the paper's aligner strength w (0 = none)
    negative_bank_size: int = 64


def migrate_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict of before the diffusers vocabulary, in today's names.

    Until checkpoints of the G2PDiffusionPipeline layout, ``sampling.guidance_scale``
    was the aligner's w and ``sampling.cfg_scale`` classifier-free guidance.
    """
    s = d.get("sampling")
    if isinstance(s, dict) and "cfg_scale" in s:
        s = dict(s)
        w = s.pop("guidance_scale", SamplingConfig.aligner_guidance_scale)
        s["guidance_scale"] = s.pop("cfg_scale")
        s["aligner_guidance_scale"] = w
        d = {**d, "sampling": s}
    return d


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's optimisation knobs (each stage has its own section).

    The paper's settings (Adam, lr 1e-5, batch 128, cosine schedule, 100k steps)
    are the ``paper`` preset's ``train_diffusion``.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA of the trained weights
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` stage (``pipelines/evaluate.py``): Tables 1-2, Figure 4, section 4.4.

    ``barcodes_per_species`` test records per species are evaluated (0: every
    test record, the default: the power of a comparison comes from barcodes
    and species, not from samples); each generated row draws ``num_samples``
    images per barcode (the largest k) and best-of-k is read for each k in
    ``ks`` from the same samples. The paper's full tables: ``num_samples: 100``,
    ``ks: [1, 5, 10, 20, 50, 100]`` (the ``paper`` preset). The success
    threshold is fitted on held-out ``val`` / ``val_unseen`` images (never
    test): the judge's score above which only ``threshold_fpr`` of them score
    with the barcode of another species of their genus (hard negatives), from
    ``threshold_pairs`` records (0: all); without val records, on training
    images against other species' barcodes.
    ``batch_barcodes`` barcodes go through the pipeline at once; image j of
    barcode i is seeded ``image_seed(seed, i, j)`` in both generated rows, so
    they are paired sample for sample. Variation: ``vary_barcodes``
    seen barcodes x ``vary_samples`` images per mutation rate and latitude
    (the paper's sweeps), per step of the interpolation toward a sibling
    species' barcode (``interpolation_steps``) and for another haplotype of
    the same species. The controlled Bergmann test: ``bergmann_species``
    seen test species (0: all) x ``bergmann_samples`` images from shared
    noise at two latitudes inside each species' range and two longitudes
    (the negative control), next to true renders at the same places.
    """

    barcodes_per_species: int = 0
    max_species: int = 0  # >0: only this many species per split (evenly spaced, sorted); accuracy still over all
    num_samples: int = 3  # 3 keeps `make run` under 45 minutes on 2 cores (power comes from barcodes)
    ks: tuple[int, ...] = (1, 3)
    bootstrap_reps: int = 1000
    seed: int = 0
    threshold_pairs: int = 0
    threshold_fpr: float = 0.05
    batch_barcodes: int = 6
    vary_barcodes: int = 24  # one per species: the intervals resample them
    vary_samples: int = 2
    mutation_rates: tuple[float, ...] = MUTATION_RATES
    latitudes: tuple[float, ...] = LATITUDES
    interpolation_steps: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    bergmann_species: int = 0  # 0: every seen test species
    bergmann_samples: int = 10  # images per species and place, shared noise across places

    def __post_init__(self) -> None:
        steps = self.interpolation_steps
        if (len(steps) < 2 or list(steps) != sorted(steps) or steps[0] != 0.0 or steps[-1] != 1.0
                or any(not 0.0 <= f <= 1.0 for f in steps)):
            raise ConfigError(f"evaluate.interpolation_steps: {list(steps)!r} must rise from 0.0 to 1.0")
        if self.bergmann_samples < 1 or self.bergmann_species < 0:
            raise ConfigError(f"evaluate.bergmann_samples / bergmann_species: {self.bergmann_samples!r} / "
                              f"{self.bergmann_species!r} (need >= 1 / >= 0)")
        if not 0.0 < self.threshold_fpr < 1.0:
            raise ConfigError(f"evaluate.threshold_fpr: {self.threshold_fpr!r} is not a false-positive rate "
                              "strictly between 0 and 1 (e.g. 0.05)")


@dataclass(frozen=True)
class G2PConfig:
    """The root: its fields are the top-level keys of ``params.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pretrain_conditioner: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=1e-3))
    train_vae: TrainConfig = field(default_factory=lambda: TrainConfig(steps=800, batch_size=16, lr=1e-3))
    train_base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=1e-3, ema_decay=0.99))
    train_diffusion: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2500, batch_size=32, lr=1e-3, ema_decay=0.99))
    train_aligner: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, batch_size=64, lr=1e-3))
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train_judge: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4800, batch_size=64, lr=3e-3,
                                                                         weight_decay=0.01, log_every=20,
                                                                         checkpoint_every=1000))
    trait_reader: TraitReaderConfig = field(default_factory=TraitReaderConfig)
    train_trait_reader: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=64, lr=2e-3,
                                                                                weight_decay=0.01, log_every=20,
                                                                                checkpoint_every=300))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "G2PConfig":
        return _build(cls, d, "")

    @classmethod
    def from_json(cls, s: str) -> "G2PConfig":
        return cls.from_dict(json.loads(s))

    def override(self, d: dict[str, Any]) -> "G2PConfig":
        """A copy with the (possibly partial, nested) dict ``d`` applied on top."""
        return _build(type(self), _deep_merge(self.to_dict(), d), "")

    def set(self, dotted: str, value: Any) -> "G2PConfig":
        """A copy with one dotted key (``"sampling.steps"``) replaced."""
        parts = dotted.split(".")
        patch: dict[str, Any] = {parts[-1]: value}
        for p in reversed(parts[:-1]):
            patch = {p: patch}
        return self.override(patch)


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------


TRAIN_STAGES = ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner")


def preset(name: str) -> G2PConfig:
    """A preset by name (``tiny``, ``default``, ``paper``, ``large``): their values are in :mod:`g2p.presets`."""
    from g2p.presets import PRESETS

    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def load_params(path: str | Path = "params.yaml", *, preset_name: str | None = None) -> G2PConfig:
    """Read ``params.yaml`` strictly; with ``preset_name`` it is applied on top of that preset."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    base = preset(preset_name) if preset_name else G2PConfig()
    sections = {f.name for f in dataclasses.fields(G2PConfig)}
    # params.yaml may hold sections for the pipeline's own stages (read by
    # pipelines/); the model config takes its own sections and ignores none
    # silently: keys outside both are errors.
    extra = set(raw) - sections - set(PIPELINE_SECTIONS)
    if extra:
        raise ConfigError(f"params.yaml: unknown top-level key(s) {sorted(extra)}")
    return base.override({k: v for k, v in raw.items() if k in sections})


# Sections of params.yaml that belong to pipeline stages (training, evaluation,
# serving) rather than the model; pipelines/ validates them itself.
PIPELINE_SECTIONS: tuple[str, ...] = (  # each validated where it is read:
    "ray",  # pipelines/ray_train.py: RaySection
    "predict",  # pipelines/predict.py: PredictSection
    "register", "promote",  # pipelines/registry.py: RegisterSection, PromoteSection
    "serve",  # serving/config.py: ServeSection
)


# ----------------------------------------------------------------------------
# strict builder
# ----------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type, d: Any, path: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {d!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{sorted(unknown)[0]} (known: {sorted(names)})")
    kwargs = {}
    for name, value in d.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        item = args[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for a in get_args(tp):
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported type {tp}")
