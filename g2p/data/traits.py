"""The phenotype side: species traits inherited down the tree, and per-image nuisance.

Each species has a latent trait vector ``z`` (:data:`TRAIT_NAMES`, one float
each): the sum of one Gaussian increment per tree level (order, family, genus,
species) with per-trait scales :data:`LEVEL_SCALES`, so species of one genus
look alike, genera of one family less so, and orders differ boldly.
``DataConfig.trait_contrast`` multiplies every increment below the order level
(higher: species easier to tell apart). Three things are not left to chance,
because a model that sees 64 x 64 images must be able to learn them:

- order body hue is spread evenly round the colour wheel;
- the wing plan (none, one or two membranous pairs, elytra, scaled wings) is an
  order-level category that a family changes only rarely;
- inside a family the species' pattern count, pattern hue and wing tint are
  *spaced* (distinct steps from the family value, in a random order per
  trait), so species of a family always differ in pattern and tint while
  sharing body plan and (nearly) body colour.

:func:`decode` maps ``z`` to drawing parameters (colours in HSV, sizes as
fractions of body length, counts); :mod:`g2p.data.render` draws them.

Environment: a record's body size is ``size_base * (1 + bergmann_coefficient *
|lat|)`` (Bergmann's rule: larger bodies at higher latitudes; the default 0.008
per degree makes a specimen at 60 degrees 48% longer than one at the equator).

Individuals (:func:`individuals`, :func:`record_traits`): each record is
female or male at even odds; males (scaled by ``DataConfig.dimorphism``) have
12% smaller bodies, 15% shorter abdomens and 35% longer antennae. A
``damage_fraction`` share of specimens lost a leg or an antenna or has a torn
wing (drawing only; the traits are the species'). Thermal melanism, a
genotype-by-environment effect that differs by clade: the families drawn as
melanic (``melanic_family_fraction``) have body lightness ``1 -
melanism_coefficient * |lat|`` times their species' value; the others'
colour does not depend on the place.

Nuisance per image, all scaled by ``DataConfig.nuisance`` (0 = none): rotation
``pose_deg`` ~ U(-15, 15) degrees (pose costs a small UNet the most, so the
default keeps it modest; 2 gives the prototype's +-30), centre offset
``offset_x``/``offset_y`` ~ U(-0.04, 0.04) of the image, brightness
``light_gain`` ~ 1 + N(0, 0.05), colour temperature ``light_warmth`` ~
N(0, 0.02), background shade ``bg_tone`` ~ N(0, 0.015).
"""

from __future__ import annotations

import numpy as np

from g2p.config import DataConfig
from g2p.data.genome import Taxonomy

TRAIT_NAMES: tuple[str, ...] = (
    "body_hue", "body_light", "body_sat", "pattern_hue", "pattern_light", "pattern_kind",
    "pattern_count", "wing_type", "wing_hue", "wing_length", "wing_width", "wing_angle",
    "head_size", "thorax_size", "abdomen_length", "abdomen_width", "waist", "leg_length",
    "antenna_length", "antenna_club", "size_base",
)
T = {name: i for i, name in enumerate(TRAIT_NAMES)}

# Increment scales per level: (order, family, genus, species). body_hue's order
# level is the even spread; wing_type is categorical (see _wing_types); the
# species level of the SPACED traits is the spacing step.
LEVEL_SCALES: dict[str, tuple[float, float, float, float]] = {
    "body_hue": (0.0, 0.045, 0.02, 0.01),
    "body_light": (0.9, 0.5, 0.25, 0.12),
    "body_sat": (0.8, 0.5, 0.25, 0.12),
    "pattern_hue": (0.3, 0.15, 0.08, 0.17),
    "pattern_light": (0.8, 0.5, 0.3, 0.2),
    "pattern_kind": (1.2, 1.0, 0.3, 0.1),
    "pattern_count": (1.5, 1.5, 1.5, 1.0),
    "wing_type": (0.0, 0.0, 0.0, 0.0),
    "wing_hue": (0.3, 0.15, 0.08, 0.2),
    "wing_length": (0.9, 0.5, 0.3, 0.45),
    "wing_width": (0.9, 0.5, 0.3, 0.45),
    "wing_angle": (0.9, 0.5, 0.3, 0.3),
    "head_size": (0.9, 0.5, 0.25, 0.15),
    "thorax_size": (0.9, 0.5, 0.25, 0.15),
    "abdomen_length": (0.9, 0.5, 0.25, 0.2),
    "abdomen_width": (0.9, 0.6, 0.3, 0.25),
    "waist": (1.5, 0.6, 0.2, 0.1),
    "leg_length": (0.9, 0.5, 0.3, 0.3),
    "antenna_length": (0.9, 0.6, 0.4, 0.4),
    "antenna_club": (1.5, 0.8, 0.3, 0.1),
    "size_base": (0.6, 0.4, 0.3, 0.3),
}
SPACED = ("pattern_count", "pattern_hue", "wing_hue")
WING_TYPES = ("none", "membrane_1", "membrane_2", "elytra", "scaled")
# The plans of the real orders at the head of names.ORDER_NAMES.
_ORDER_WINGS = {"Diptera": 1, "Hymenoptera": 2, "Coleoptera": 3, "Lepidoptera": 4, "Hemiptera": 2,
                "Trichoptera": 4, "Psocodea": 2, "Thysanoptera": 1, "Orthoptera": 3}
NUISANCE_NAMES = ("pose_deg", "offset_x", "offset_y", "light_gain", "light_warmth", "bg_tone")
INDIVIDUAL_NAMES = ("sex", "damage", "damage_part")  # per record: 0 female / 1 male; see DAMAGE
DAMAGE = ("none", "leg", "antenna", "wing")  # ``damage`` indexes this; ``damage_part`` picks leg 0-5 or side 0-1
MALE = {"size_base": -0.12, "abdomen_length": -0.15, "antenna_length": 0.35}  # relative change at dimorphism 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _wing_types(tax: Taxonomy, rng: np.random.Generator) -> np.ndarray:
    """(n_families,) wing plan per family: its order's, changed in 1 family of 12."""
    n_orders = len(tax.order_names)
    order_type = np.array([_ORDER_WINGS.get(n, int(rng.integers(1, 5))) for n in tax.order_names])
    n_fam = len(tax.family_names)
    fam_type = np.repeat(order_type, n_fam // n_orders)
    change = rng.random(n_fam) < 1 / 12
    fam_type[change] = rng.integers(0, 5, size=int(change.sum()))
    return fam_type


def species_traits(tax: Taxonomy, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """(S, n_traits) float32 latent trait vectors, inherited down the tree."""
    n_o, n_f, n_g = len(tax.order_names), len(tax.family_names), len(tax.genus_names)
    c = cfg.trait_contrast
    scales = np.array([LEVEL_SCALES[n] for n in TRAIT_NAMES])  # (n_traits, 4)
    z_o = rng.normal(size=(n_o, len(TRAIT_NAMES))) * scales[:, 0]
    z_o[:, T["body_hue"]] = (np.arange(n_o) + rng.uniform(-0.15, 0.15, n_o)) / n_o
    z_f = z_o[np.arange(n_f) // (n_f // n_o)] + c * rng.normal(size=(n_f, len(TRAIT_NAMES))) * scales[:, 1]
    z_g = z_f[np.arange(n_g) // (n_g // n_f)] + c * rng.normal(size=(n_g, len(TRAIT_NAMES))) * scales[:, 2]
    z = z_g[tax.species_genus] + c * rng.normal(size=(tax.n_species, len(TRAIT_NAMES))) * scales[:, 3]
    # Spaced traits: the species of a family take distinct steps (a random order
    # per trait) from the family value, plus a little of their genus' drift, so
    # no two species of a family share pattern hue, wing tint and count.
    m = tax.n_species // n_f
    for name in SPACED:
        i = T[name]
        steps = np.argsort(rng.random((n_f, m)), axis=1).reshape(-1) - (m - 1) / 2.0  # (S,)
        if name == "pattern_count":  # integer steps, no jitter: the count bins stay distinct
            z[:, i] = np.floor(z_f[tax.species_family, i]) + (c > 0) * steps + 0.5 * (m % 2 == 0) + 0.5
            continue
        genus_drift = z_g[tax.species_genus, i] - z_f[tax.species_family, i]
        step = min(c * scales[i, 3], 0.85 / m)  # all steps fit inside most of the colour wheel
        z[:, i] = z_f[tax.species_family, i] + steps * step + 0.3 * genus_drift
    z[:, T["wing_type"]] = _wing_types(tax, rng)[tax.species_family]
    return z.astype(np.float32)


def decode(z: np.ndarray) -> dict[str, np.ndarray]:
    """Drawing parameters from latent traits ``z`` (N, n_traits); every value is (N,)."""
    g = {name: z[:, i].astype(np.float64) for i, name in enumerate(TRAIT_NAMES)}
    s = {k: _sigmoid(v) for k, v in g.items()}
    body_light = 0.16 + 0.46 * s["body_light"]
    kind = np.minimum((s["pattern_kind"] * 3).astype(np.int64), 2)  # 0 bands, 1 spots, 2 stripes
    count = np.mod(np.floor(g["pattern_count"]), 5) + 1  # cyclic, so spaced steps stay distinct
    count = np.where(kind == 2, np.mod(count - 1, 3) + 1, count + (kind == 0))  # bands 2-6, stripes 1-3
    return {
        "body_hue": np.mod(g["body_hue"], 1.0),
        "body_light": body_light,
        "body_sat": 0.35 + 0.6 * s["body_sat"],
        "pattern_hue": np.mod(g["pattern_hue"], 1.0),
        # Patterns contrast with the body: pale on dark bodies, dark on pale ones.
        "pattern_light": np.where(body_light < 0.4, 0.62 + 0.33 * s["pattern_light"],
                                  0.05 + 0.2 * s["pattern_light"]),
        "pattern_kind": kind.astype(np.float64),
        "pattern_count": count,
        "wing_type": np.rint(g["wing_type"]),
        "wing_hue": np.mod(g["wing_hue"], 1.0),
        "wing_length": 0.5 + 0.55 * s["wing_length"],
        "wing_width": 0.14 + 0.26 * s["wing_width"],
        "wing_angle": 12.0 + 38.0 * s["wing_angle"],
        "head_size": 0.11 + 0.11 * s["head_size"],
        "thorax_size": 0.17 + 0.13 * s["thorax_size"],
        "abdomen_length": 0.36 + 0.3 * s["abdomen_length"],
        "abdomen_width": 0.16 + 0.24 * s["abdomen_width"],
        "waist": np.where(s["waist"] > 0.6, 0.1 * (s["waist"] - 0.6) / 0.4, 0.0),
        "leg_length": 0.35 + 0.55 * s["leg_length"],
        "antenna_length": 0.15 + 0.6 * s["antenna_length"],
        "antenna_club": (s["antenna_club"] > 0.6).astype(np.float64),
        "size_base": 0.85 + 0.3 * s["size_base"],
    }


def size_multiplier(lat: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Bergmann's rule: ``1 + bergmann_coefficient * |lat|`` (1 where lat is unknown)."""
    return 1.0 + cfg.bergmann_coefficient * np.nan_to_num(np.abs(lat), nan=0.0)


def nuisance(n: int, cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image pose, placement and lighting, scaled by ``cfg.nuisance``."""
    v = cfg.nuisance
    return {
        "pose_deg": rng.uniform(-15.0, 15.0, n) * v,
        "offset_x": rng.uniform(-0.04, 0.04, n) * v,
        "offset_y": rng.uniform(-0.04, 0.04, n) * v,
        "light_gain": 1.0 + rng.normal(0.0, 0.05, n) * v,
        "light_warmth": rng.normal(0.0, 0.02, n) * v,
        "bg_tone": rng.normal(0.0, 0.015, n) * v,
    }


def melanic_families(n_families: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_families,) bool: the families whose body colour darkens with latitude (thermal melanism)."""
    k = int(round(cfg.melanic_family_fraction * n_families))  # exactly that share, families at random
    out = np.zeros(n_families, dtype=bool)
    out[rng.permutation(n_families)[:k]] = True
    return out


def melanism_multiplier(lat: np.ndarray, melanic: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Body-lightness factor per record: ``1 - melanism_coefficient * |lat|`` where melanic, else 1."""
    loss = cfg.melanism_coefficient * np.nan_to_num(np.abs(lat), nan=0.0)
    return np.where(melanic, 1.0 - loss, 1.0)


def individuals(n: int, cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per record: ``sex`` (0 female, 1 male), ``damage`` (index into :data:`DAMAGE`), ``damage_part``."""
    sex = (rng.random(n) < 0.5).astype(np.int8)
    damaged = rng.random(n) < cfg.damage_fraction
    damage = np.where(damaged, rng.integers(1, len(DAMAGE), n), 0).astype(np.int8)
    part = rng.integers(0, 6, n).astype(np.int8)  # leg 0-5; antenna and wing use part % 2 (the side)
    return {"sex": sex, "damage": damage, "damage_part": part}


def record_traits(species_decoded: dict[str, np.ndarray], sex: np.ndarray, melanism: np.ndarray,
                  cfg: DataConfig) -> dict[str, np.ndarray]:
    """The traits that draw each record: its species' decoded traits (one row per record) with the
    record's sex (:data:`MALE`, scaled by ``dimorphism``) and thermal melanism (``melanism``, a
    factor on body lightness) applied. Returns new arrays; the input is not changed."""
    out = dict(species_decoded)
    male = np.asarray(sex, dtype=np.float64) * cfg.dimorphism
    for name, rel in MALE.items():
        out[name] = np.asarray(species_decoded[name], dtype=np.float64) * (1.0 + rel * male)
    out["body_light"] = np.asarray(species_decoded["body_light"], dtype=np.float64) * melanism
    return out
