"""Specimens of fresh species drawn from the benchmark's prior, rendered exactly as the benchmark renders them.

Why: a grader trained only on the benchmark's training images sees the same 72
species over and over and partly learns *which species* an image shows instead
of *what traits* it shows; its error on unseen species is then far above its
error on seen ones. The benchmark's images are a pure function of trait
parameters (:func:`g2p.data.render.draw_specimen`), so any number of images of
species nobody will ever evaluate can be drawn from the same prior instead.

A prior record is what :func:`g2p.data.records.make_world_and_records` makes of a
record, with the benchmark's own functions, in a *fresh world*: a new taxonomy
(:func:`g2p.data.genome.build_taxonomy`) and new species traits
(:func:`g2p.data.traits.species_traits`, decoded by :func:`~g2p.data.traits.decode`),
a species picked uniformly from it, a place from that species' range
(:func:`g2p.data.records.places`), the Bergmann size multiplier
(:func:`~g2p.data.traits.size_multiplier`) and the per-image nuisance
(:func:`~g2p.data.traits.nuisance`). The image is drawn at ``DataConfig.image_size``,
JPEG-encoded at the synthesiser's quality and decoded and resized by
:func:`g2p.data.dataset.load_image`, as every benchmark image is on its way into
a model.

Determinism and independence: record ``i`` belongs to world ``i // WORLD_RECORDS``,
and world ``w`` draws from ``SeedSequence(seed, spawn_key=(PRIOR_SPAWN_KEY, w))``.
The benchmark's own streams are ``SeedSequence(data.seed)`` children (spawn keys
``(0,)`` .. ``(7,)``), so no prior world replays the benchmark's world, and nothing of
its val/test records (barcodes, species, images) is used. The same ``(cfg, seed)``
gives the same records and pixels whatever the chunking.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch

from g2p.config import DataConfig
from g2p.data import genome, traits
from g2p.data.dataset import load_image
from g2p.data.records import places
from g2p.data.render import draw_specimen
from g2p.data.synth import JPEG_QUALITY

PRIOR_SPAWN_KEY = 15_015  # first spawn-key word of every prior world: disjoint from the benchmark's streams
WORLD_RECORDS = 32  # records per fresh world: with ~100 species per world nearly every record is a new species
CHUNK = 256  # records rendered per yielded chunk


def world_records(cfg: DataConfig, seed: int, world: int) -> dict[str, np.ndarray]:
    """The drawing parameters of the ``WORLD_RECORDS`` records of fresh world ``world``.

    Keys: every :data:`g2p.data.traits.TRAIT_NAMES` (decoded, as ``draw_specimen``
    reads them, with each record's sex and thermal melanism applied), ``size_mult``, ``damage`` and
    ``damage_part``, every :data:`g2p.data.traits.NUISANCE_NAMES`, and
    ``lat`` (degrees); each (WORLD_RECORDS,) float64.
    """
    if world < 0:
        raise ValueError(f"world: must be >= 0, got {world}")
    seq = np.random.SeedSequence(seed, spawn_key=(PRIOR_SPAWN_KEY, world))
    r_names, r_traits, r_pick, r_place, r_range, r_nuis, r_indiv, r_clade = (np.random.default_rng(s)
                                                                            for s in seq.spawn(8))
    tax = genome.build_taxonomy(cfg, r_names)
    decoded = traits.decode(traits.species_traits(tax, cfg, r_traits))
    species = r_pick.integers(0, tax.n_species, WORLD_RECORDS)
    lat, _ = places(tax, species, r_place, r_range)
    ind = traits.individuals(WORLD_RECORDS, cfg, r_indiv)
    melanic = traits.melanic_families(len(tax.family_names), cfg, r_clade)[tax.species_family[species]]
    out = traits.record_traits({k: np.asarray(v[species], dtype=np.float64) for k, v in decoded.items()},
                               ind["sex"], traits.melanism_multiplier(lat, melanic, cfg), cfg)
    out.update({k: np.asarray(ind[k], dtype=np.float64) for k in ("damage", "damage_part")})
    out["size_mult"] = np.asarray(traits.size_multiplier(lat, cfg), dtype=np.float64)
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in traits.nuisance(WORLD_RECORDS, cfg, r_nuis).items()})
    out["lat"] = np.asarray(lat, dtype=np.float64)
    return out


def prior_records(cfg: DataConfig, seed: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Drawing parameters of prior records ``start .. stop - 1`` (see :func:`world_records`)."""
    if not 0 <= start <= stop:
        raise ValueError(f"start, stop: need 0 <= start <= stop, got {start}, {stop}")
    first, last = start // WORLD_RECORDS, -(-stop // WORLD_RECORDS)
    worlds = [world_records(cfg, seed, w) for w in range(first, last)]
    if not worlds:
        return {k: np.zeros(0) for k in world_records(cfg, seed, 0)}
    off = start - first * WORLD_RECORDS
    return {k: np.concatenate([w[k] for w in worlds])[off:off + stop - start] for k in worlds[0]}


def render_record(p: dict[str, float], source_size: int, size: int) -> np.ndarray:
    """One record's image as a model sees a benchmark image: drawn at ``source_size``, JPEG-encoded as the
    synthesiser writes it, decoded and resized to ``size`` by :func:`g2p.data.dataset.load_image`; uint8 (3, S, S)."""
    buf = io.BytesIO()
    draw_specimen(p, source_size).save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    return load_image(buf, size)  # type: ignore[arg-type]  # PIL opens a file object as a path


def render_prior(cfg: DataConfig, n: int, seed: int, size: int, *, chunk: int = CHUNK,
                 progress: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """``n`` prior records in chunks of ``chunk``: (uint8 images (k, 3, size, size), drawing parameters (k,) each).

    Streaming, so a caller that keeps only what it needs holds one chunk of
    full-size drawings at a time; ``progress`` shows a bar (about 3 ms per image on one core).
    """
    if n < 0:
        raise ValueError(f"n: the number of prior renders must be >= 0, got {n}")
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    if size < 1:
        raise ValueError(f"size: must be >= 1 pixel, got {size}")
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="prior renders", unit="img", mininterval=2.0, disable=not progress)
    try:
        for a in range(0, n, chunk):
            cols = prior_records(cfg, seed, a, min(n, a + chunk))
            keys = list(cols)
            rows = [dict(zip(keys, r)) for r in zip(*(cols[k].tolist() for k in keys))]
            images = np.empty((len(rows), 3, size, size), dtype=np.uint8)
            for i, p in enumerate(rows):
                images[i] = render_record(p, cfg.image_size, size)
            bar.update(len(rows))
            yield torch.from_numpy(images), cols
    finally:
        bar.close()


def prior_set(cfg: DataConfig, n: int, seed: int, size: int, *,
              progress: bool = False) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """All of :func:`render_prior` at once: uint8 (n, 3, size, size) and each drawing parameter (n,)."""
    images, cols = [], []
    for im, c in render_prior(cfg, n, seed, size, progress=progress):
        images.append(im)
        cols.append(c)
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), prior_records(cfg, seed, 0, 0)
    return torch.cat(images), {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
