"""The genotype side of the synthetic benchmark: a taxonomy and COI-like barcodes.

Taxonomy: ``num_orders`` orders > ``families_per_order`` families > ``genera_per_family``
genera > species. Each genus holds ``species_per_genus`` *seen* species (scientific
binomials; train/val/test), ``unseen_species_per_genus`` *unseen* ones and
``heldout_species_per_genus`` *held-out* ones (placeholder names; the unseen and
other_heldout splits), in that order. Species ids are global and contiguous per
genus, so ``species_genus`` etc. are plain index arrays.

Barcodes imitate the insect COI 5' region (the ~658 nt "Folmer" barcode):

1. A root sequence is drawn codon by codon from position-specific base
   frequencies that make it AT-rich (about 69% A+T overall, ~88% at third codon
   positions, as in insect mitochondria).
2. It is copied down the tree; each copy at level ``lvl`` gets
   ``Poisson(rate_lvl * sum(w))`` substitutions at sites drawn with weights
   ``w`` by codon position (third positions ~10x the second, the way synonymous
   sites evolve fastest), each to a base drawn from that position's
   frequencies. Related species therefore share most of their barcode and the
   within-species spread (``individual_mutation_rate``) is far below the
   between-species one: the "barcode gap".
3. Individuals carry *haplotypes*: the species sequence plus at least one
   substitution inside the *core* (the part every read covers), all distinct,
   so a haplotype kept out of train never shows up there under another trim.
4. A read is a window of the haplotype's template: most start at the primer
   end, a tenth a few nt earlier or later; lengths cluster just below 658 with
   a tail to ``barcode_length +- barcode_length_jitter`` (some reads pass 660
   and get trimmed by the normaliser). A share of reads carry N's (a run at one
   end, or a few scattered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from g2p.config import DataConfig
from g2p.data import names

BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
N_BASE = ord("N")
_BASE_INDEX = np.full(256, 0, dtype=np.int8)
_BASE_INDEX[BASES] = np.arange(4)
# P(A, C, G, T) at codon positions 1, 2, 3 (AT: 0.58, 0.61, 0.88).
CODON_COMPOSITION = np.array([
    [0.30, 0.17, 0.25, 0.28],
    [0.18, 0.24, 0.15, 0.43],
    [0.42, 0.08, 0.04, 0.46],
])
CODON_RATE = np.array([0.55, 0.20, 2.25])  # relative substitution rates, mean 1
SHIFT_BACK = 12  # reads may start up to this many nt before the usual primer end
SHIFT_FWD = 4  # ... or this many after it
SHIFTED_READS = 0.10  # share of reads not starting at the primer end
KIND_SEEN, KIND_UNSEEN, KIND_HELDOUT = 0, 1, 2


@dataclass(frozen=True)
class Taxonomy:
    """Names and parent links of every taxon; species arrays are indexed by species id."""

    order_names: list[str]
    family_names: list[str]  # global family index -> name
    subfamily_names: list[str]  # per family
    genus_names: list[str]
    genus_has_subfamily: np.ndarray  # (n_genera,) bool: the rest are unassigned, as often in BOLD
    species_order: np.ndarray  # (S,) int32
    species_family: np.ndarray
    species_genus: np.ndarray
    species_kind: np.ndarray  # (S,) int8: KIND_SEEN / KIND_UNSEEN / KIND_HELDOUT
    species_rank: np.ndarray  # (S,) int32: position of the species inside its genus
    species_names: list[str]
    species_bins: list[str]

    @property
    def n_species(self) -> int:
        return len(self.species_names)


def species_per_genus(cfg: DataConfig) -> int:
    return cfg.species_per_genus + cfg.unseen_species_per_genus + cfg.heldout_species_per_genus


def build_taxonomy(cfg: DataConfig, rng: np.random.Generator) -> Taxonomy:
    """The tree of names; sizes from ``cfg``."""
    n_fam = cfg.num_orders * cfg.families_per_order
    n_gen = n_fam * cfg.genera_per_family
    k = species_per_genus(cfg)
    orders = names.order_names(rng, cfg.num_orders)
    families = names.unique_words(rng, n_fam, suffix="idae")
    subfamilies = [f[: -len("idae")] + "inae" for f in families]
    genera = names.unique_words(rng, n_gen, taken=set(orders) | set(families))
    has_sub = rng.random(n_gen) < 0.7
    genus = np.repeat(np.arange(n_gen, dtype=np.int32), k)
    family = genus // cfg.genera_per_family
    order = family // cfg.families_per_order
    rank = np.tile(np.arange(k, dtype=np.int32), n_gen)
    kind = np.full(k, KIND_HELDOUT, dtype=np.int8)
    kind[: cfg.species_per_genus] = KIND_SEEN
    kind[cfg.species_per_genus: cfg.species_per_genus + cfg.unseen_species_per_genus] = KIND_UNSEEN
    kind = np.tile(kind, n_gen)
    n_seen = int((kind == KIND_SEEN).sum())
    epithets = iter(names.species_epithets(rng, n_seen))
    codes = iter(names.placeholder_codes(rng, len(kind) - n_seen))
    sp_names = [f"{genera[g]} {next(epithets)}" if kd == KIND_SEEN else f"{genera[g]} sp. {next(codes)}"
                for g, kd in zip(genus.tolist(), kind.tolist())]
    return Taxonomy(
        order_names=orders, family_names=families, subfamily_names=subfamilies, genus_names=genera,
        genus_has_subfamily=has_sub, species_order=order.astype(np.int32),
        species_family=family.astype(np.int32), species_genus=genus, species_kind=kind,
        species_rank=rank, species_names=sp_names, species_bins=names.bin_codes(rng, len(kind)),
    )


# ----------------------------------------------------------------------------
# sequences
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadGeometry:
    """Where reads fall on a haplotype template (all in template coordinates)."""

    length: int  # template length
    primer: int  # usual first base of a read
    core_lo: int  # [core_lo, core_hi) is inside every read
    core_hi: int
    barcode_length: int
    jitter: int


def read_geometry(cfg: DataConfig) -> ReadGeometry:
    length = SHIFT_BACK + SHIFT_FWD + cfg.barcode_length + cfg.barcode_length_jitter
    core_lo = SHIFT_BACK + SHIFT_FWD
    core_hi = cfg.barcode_length - cfg.barcode_length_jitter
    if core_hi - core_lo < 30:
        raise ValueError(
            f"data.barcode_length={cfg.barcode_length} is too short for "
            f"data.barcode_length_jitter={cfg.barcode_length_jitter}: no common core")
    return ReadGeometry(length, SHIFT_BACK, core_lo, core_hi, cfg.barcode_length, cfg.barcode_length_jitter)


def _site_weights(geom: ReadGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Codon position (0..2) and relative rate of each template site, frame set by the primer."""
    codon_pos = (np.arange(geom.length) - geom.primer) % 3
    return codon_pos, CODON_RATE[codon_pos]


def root_sequence(geom: ReadGeometry, rng: np.random.Generator) -> np.ndarray:
    """(L,) uint8 ASCII: one AT-rich COI-like template."""
    codon_pos, _ = _site_weights(geom)
    u = rng.random(geom.length)
    cum = np.cumsum(CODON_COMPOSITION[codon_pos], axis=1)
    return BASES[(u[:, None] > cum).sum(axis=1).clip(0, 3)]


def mutate(rows: np.ndarray, rate: float, geom: ReadGeometry, rng: np.random.Generator,
           lo: int = 0, hi: int | None = None, min_subs: int = 0) -> None:
    """In place: ``min_subs + Poisson(rate * sum w)`` substitutions per row in ``[lo, hi)``.

    Sites are drawn with the codon-position weights; the new base comes from
    that position's composition, never the old base (so every draw changes it).
    """
    hi = geom.length if hi is None else hi
    codon_pos, w = _site_weights(geom)
    w = w[lo:hi]
    n = rows.shape[0]
    counts = rng.poisson(rate * w.sum(), size=n) + min_subs
    total = int(counts.sum())
    if total == 0:
        return
    row_idx = np.repeat(np.arange(n), counts)
    cdf = np.cumsum(w) / w.sum()
    site = lo + np.searchsorted(cdf, rng.random(total), side="right").clip(0, hi - lo - 1)
    old = _BASE_INDEX[rows[row_idx, site]]
    probs = CODON_COMPOSITION[codon_pos[site]].copy()
    probs[np.arange(total), old] = 0.0
    cum = np.cumsum(probs, axis=1)
    u = rng.random(total) * cum[:, -1]
    new = (u[:, None] > cum).sum(axis=1).clip(0, 3)
    rows[row_idx, site] = BASES[new]


def species_sequences(tax: Taxonomy, cfg: DataConfig, geom: ReadGeometry,
                      rng: np.random.Generator) -> np.ndarray:
    """(S, L) uint8: the root evolved down order > family > genus > species."""
    seq = root_sequence(geom, rng)[None, :]
    levels = [(cfg.num_orders, cfg.order_mutation_rate), (cfg.families_per_order, cfg.family_mutation_rate),
              (cfg.genera_per_family, cfg.genus_mutation_rate),
              (species_per_genus(cfg), cfg.species_mutation_rate)]
    for fanout, rate in levels:
        seq = np.repeat(seq, fanout, axis=0)
        mutate(seq, rate, geom, rng)
    assert seq.shape[0] == tax.n_species
    return seq


def haplotypes(species_seq: np.ndarray, owner: np.ndarray, cfg: DataConfig, geom: ReadGeometry,
               rng: np.random.Generator) -> np.ndarray:
    """(H, L) uint8: one distinct haplotype per entry of ``owner`` (a species id).

    Each is its species' sequence plus ``1 + Poisson`` core substitutions at
    ``individual_mutation_rate``; duplicates (anywhere) get one more substitution
    until all cores differ, so distinct haplotypes give distinct reads.
    """
    hap = species_seq[owner]
    mutate(hap, cfg.individual_mutation_rate, geom, rng, geom.core_lo, geom.core_hi, min_subs=1)
    for _ in range(100):
        core = np.ascontiguousarray(hap[:, geom.core_lo: geom.core_hi])
        keys = core.view(np.dtype((np.void, core.shape[1]))).ravel()
        _, first = np.unique(keys, return_index=True)
        dup = np.setdiff1d(np.arange(len(hap)), first)
        if dup.size == 0:
            return hap
        sub = hap[dup]
        mutate(sub, 0.0, geom, rng, geom.core_lo, geom.core_hi, min_subs=1)
        hap[dup] = sub
    raise RuntimeError("could not make haplotypes distinct; raise individual_mutation_rate")


def read_windows(n: int, geom: ReadGeometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of ``n`` reads on their templates, int32."""
    start = np.full(n, geom.primer, dtype=np.int32)
    shifted = rng.random(n) < SHIFTED_READS
    start[shifted] = rng.integers(0, SHIFT_BACK + SHIFT_FWD + 1, size=int(shifted.sum()))
    # Most reads stop a few nt short of the full barcode (as in BIOSCAN-5M, where
    # 653-654 nt is the mode); a sixth spread over the whole jitter range.
    j = geom.jitter
    length = geom.barcode_length - 5 + rng.integers(-2, 3, size=n)
    tail = rng.random(n) < 0.15
    length[tail] = rng.integers(geom.barcode_length - j, geom.barcode_length + j + 1, size=int(tail.sum()))
    length = np.clip(length, geom.barcode_length - j, geom.barcode_length + j)
    return start, length.astype(np.int32)


def assemble_reads(templates: np.ndarray, start: np.ndarray, length: np.ndarray, n_mask: np.ndarray,
                   rng: np.random.Generator) -> pa.Array:
    """An Arrow string array of reads: ``templates[i, start:start+length]`` with N's.

    ``n_mask[i]`` (bool) marks the reads that carry N's: 60% of them a run of
    1-25 N at one end, the rest 1-8 scattered N's. ``templates`` is modified.
    """
    n, width = templates.shape
    end = start + length
    idx = np.flatnonzero(n_mask)
    if idx.size:
        run = rng.random(idx.size) < 0.6
        r_idx = idx[run]
        k = rng.integers(1, 26, size=r_idx.size)
        at_end = rng.random(r_idx.size) < 0.7  # trailing runs are the common case
        lo = np.where(at_end, end[r_idx] - k, start[r_idx])
        cols = np.arange(width)
        mask = (cols >= lo[:, None]) & (cols < (lo + k)[:, None])
        sub = templates[r_idx]
        sub[mask] = N_BASE
        templates[r_idx] = sub
        s_idx = idx[~run]
        m = rng.integers(1, 9, size=s_idx.size)
        rows = np.repeat(s_idx, m)
        pos = start[rows] + (rng.random(rows.size) * length[rows]).astype(np.int64)
        templates[rows, pos] = N_BASE
    cols = np.arange(width)
    keep = (cols >= start[:, None]) & (cols < end[:, None])
    data = templates[keep]  # row-major: the reads, concatenated
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def p_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Share of differing sites between two aligned equal-length uint8 sequences."""
    return float(np.mean(a != b))
