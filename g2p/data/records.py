"""Every record of the synthetic benchmark, as arrays, and its rows as Arrow columns.

:func:`make_world` draws the taxonomy, barcodes and traits (genome.py,
traits.py); :func:`plan_records` decides each record's species, split,
haplotype, place, read window, nuisance and identifiers, all as numpy arrays,
so 5 M records cost seconds. :func:`metadata_columns` and
:func:`truth_columns` turn a slice of records into Arrow columns (strings via
``pyarrow.compute``, never a Python loop per row except the MD5 of the chunk
folder) for the CSV and parquet writers.

Split rules (as BIOSCAN-5M's partitioning): each seen species' train, val and
test records read from three disjoint haplotype pools, so a val/test barcode
never occurs in train; val and test have a fixed count per species (flat),
train a log-normal spread around ``train_per_species``; unseen species fill
key/val/test_unseen, held-out ones other_heldout; pretrain records are
unlabelled re-reads of train or other_heldout haplotypes, never of val, test
or unseen ones, so pretraining leaks no evaluation barcode. Pretrain labels
stop at the genus (30%), family (55%) or order (15%).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from g2p.config import DataConfig
from g2p.data import genome, names, traits
from g2p.data.render import body_area_fraction

SPLIT_CODES = ("pretrain", "train", "val", "test", "key_unseen", "val_unseen", "test_unseen", "other_heldout")
S = {s: i for i, s in enumerate(SPLIT_CODES)}
HAPLOTYPE_SHARE = 0.6  # distinct haplotypes per record in a (species, split) pool
WELLS = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]


@dataclass(frozen=True)
class World:
    """What is fixed per species: names, haplotype templates and traits."""

    cfg: DataConfig
    tax: genome.Taxonomy
    geom: genome.ReadGeometry
    haplotypes: np.ndarray  # (H, L) uint8 templates
    z: np.ndarray  # (S, n_traits) latent traits
    decoded: dict[str, np.ndarray]  # drawing parameters per species
    melanic: np.ndarray  # (n_families,) bool: thermal melanism (traits.melanic_families)


def _pools(tax: genome.Taxonomy, cfg: DataConfig, rng: np.random.Generator):
    seen = np.flatnonzero(tax.species_kind == genome.KIND_SEEN)
    w = np.exp(rng.normal(0.0, cfg.train_count_spread, seen.size))  # a long tail of train counts, mean kept
    n_train = np.maximum(1, np.rint(cfg.train_per_species * w / w.mean())).astype(np.int64)
    unseen = np.flatnonzero(tax.species_kind == genome.KIND_UNSEEN)
    held = np.flatnonzero(tax.species_kind == genome.KIND_HELDOUT)
    return [("train", seen, n_train), ("val", seen, cfg.val_per_species),
            ("test", seen, cfg.test_per_species),
            ("key_unseen", unseen, cfg.key_unseen_per_species),
            ("val_unseen", unseen, cfg.val_unseen_per_species),
            ("test_unseen", unseen, cfg.test_unseen_per_species),
            ("other_heldout", held, cfg.other_heldout_per_species)]


def _assign(tax: genome.Taxonomy, cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Species, split and haplotype of every record, and the owner species of each haplotype."""
    sp, split, hap, owner = [], [], [], []
    first_of = np.full(tax.n_species, -1, dtype=np.int64)  # the pool pretrain may re-read
    n_of = np.zeros(tax.n_species, dtype=np.int64)
    n_pools = 0
    for name, species, counts in _pools(tax, cfg, rng):
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), species.shape)
        species, counts = species[counts > 0], counts[counts > 0]
        nh = np.maximum(1, np.ceil(counts * HAPLOTYPE_SHARE)).astype(np.int64)
        first = n_pools + np.cumsum(nh) - nh
        n_pools += int(nh.sum())
        owner.append(np.repeat(species, nh))
        rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        sp.append(np.repeat(species, counts))
        split.append(np.full(sp[-1].size, S[name], dtype=np.int8))
        hap.append(np.repeat(first, counts) + rank % np.repeat(nh, counts))  # every haplotype used
        if name in ("train", "other_heldout"):
            first_of[species], n_of[species] = first, nh
    sources = np.flatnonzero(first_of >= 0)
    if cfg.pretrain_records and sources.size:
        pt = sources[rng.integers(0, sources.size, cfg.pretrain_records)]
        sp.append(pt)
        split.append(np.full(pt.size, S["pretrain"], dtype=np.int8))
        hap.append(first_of[pt] + (rng.random(pt.size) * n_of[pt]).astype(np.int64))
    order = rng.permutation(sum(a.size for a in sp))  # the CSV interleaves splits, like the real file
    return {"species": np.concatenate(sp)[order].astype(np.int32), "split": np.concatenate(split)[order],
            "haplotype": np.concatenate(hap)[order].astype(np.int32),
            "owner": np.concatenate(owner).astype(np.int32)}


def places(tax: genome.Taxonomy, species: np.ndarray, rng: np.random.Generator,
            rng_sp: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates from each species' range: a centre, often near its family's region, and a spread."""
    n_sites = len(names.SITES)
    fam_site = rng_sp.integers(0, n_sites, len(tax.family_names))
    near = rng_sp.random(tax.n_species) < 0.7
    centre_site = np.where(near, fam_site[tax.species_family], rng_sp.integers(0, n_sites, tax.n_species))
    centre = names.SITE_LATLON[centre_site] + rng_sp.normal(0.0, 2.0, (tax.n_species, 2))
    spread = rng_sp.uniform(2.0, 9.0, tax.n_species)  # sd in degrees of latitude; longitude 1.5x
    lat = np.clip(centre[species, 0] + spread[species] * rng.normal(size=species.size), -55.0, 72.0)
    lon = centre[species, 1] + 1.5 * spread[species] * rng.normal(size=species.size)
    return np.round(lat, 4), np.round((lon + 180.0) % 360.0 - 180.0, 4)


def make_world_and_records(cfg: DataConfig) -> tuple[World, dict[str, np.ndarray]]:
    """The world and every record's plan; each part draws from its own ``SeedSequence`` child."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(10)]
    r_names, r_genome, r_traits, r_plan, r_place, r_range, r_nuis, r_ids, r_indiv, r_clade = rngs
    tax = genome.build_taxonomy(cfg, r_names)
    geom = genome.read_geometry(cfg)
    sp_seq = genome.species_sequences(tax, cfg, geom, r_genome)
    z = traits.species_traits(tax, cfg, r_traits)
    rec = _assign(tax, cfg, r_plan)
    world = World(cfg, tax, geom, genome.haplotypes(sp_seq, rec.pop("owner"), cfg, geom, r_genome), z,
                  traits.decode(z), traits.melanic_families(len(tax.family_names), cfg, r_clade))
    n = rec["species"].size
    rec["lat"], rec["lon"] = places(tax, rec["species"], r_place, r_range)
    rec["site"] = names.nearest_site(rec["lat"], rec["lon"])
    rec["read_start"], rec["read_length"] = genome.read_windows(n, geom, r_genome)
    rec["has_n"] = r_genome.random(n) < cfg.n_fraction_records
    rec["size_multiplier"] = traits.size_multiplier(rec["lat"], cfg)
    rec.update(traits.nuisance(n, cfg, r_nuis))
    rec.update(traits.individuals(n, cfg, r_indiv))
    rec["melanism"] = traits.melanism_multiplier(rec["lat"], world.melanic[tax.species_family[rec["species"]]], cfg)
    # label depth: 4 species, 3 genus, 2 family, 1 order (pretrain hides the lower ranks)
    u = r_ids.random(n)
    rec["depth"] = np.where(rec["split"] != S["pretrain"], 4, np.where(u < 0.30, 3, np.where(u < 0.85, 2, 1)))
    rec["has_bin"] = r_ids.random(n) >= 0.02
    rec.update(_identifiers(n, r_ids))
    return world, rec


def _identifiers(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Project, running number, plate slot and the size columns of every record."""
    n_proj = max(8, n // 12_000 + 8)  # ~12 k records per BOLD project: 5-digit numbers
    project = rng.integers(0, n_proj, n)
    counts = np.bincount(project, minlength=n_proj)
    number = np.empty(n, dtype=np.int64)  # running number within each project, in CSV order
    number[np.argsort(project, kind="stable")] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    number += rng.integers(1, 900, n_proj)[project]
    scale = np.round(np.clip(np.exp(rng.normal(-0.1, 0.45, n)), 0.25, 2.6), 4)
    area_fraction = np.clip((256 * scale) ** 2 / (786_432 * rng.uniform(0.6, 1.4, n)), 0.005, 1.0)
    codes, years = names.project_codes(rng, n_proj)
    return {"project": project, "number": number, "slot": rng.permutation(n) + 96 * 10_000,
            "scale_factor": scale, "area_fraction": np.round(area_fraction, 4),
            "_project_codes": np.array(codes), "_project_years": years}


def _take(values: list[str], idx: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """Arrow strings ``values[idx]``, null where ``valid`` is False."""
    ind = pa.array(np.asarray(idx).astype(np.int32), mask=None if valid is None else ~np.asarray(valid))
    return pc.take(pa.array(values, pa.string()), ind)


def _chunk_column(processid: pa.Array, split: np.ndarray) -> pa.Array:
    """The chunk folder (:func:`g2p.data.layout.chunk_for`) as Arrow strings, null where none."""
    pids = processid.to_pylist()
    out: list[str | None] = [None] * len(pids)
    for i in np.flatnonzero(np.isin(split, (S["pretrain"], S["train"], S["other_heldout"]))).tolist():
        h = hashlib.md5(pids[i].encode()).hexdigest()
        out[i] = h[:2] if split[i] == S["pretrain"] else h[:1]
    return pa.array(out, pa.string())


def metadata_columns(world: World, rec: dict[str, np.ndarray], sl: slice) -> dict[str, pa.Array]:
    """The official CSV columns for records ``sl`` (any order; the writer orders them)."""
    tax, cfg = world.tax, world.cfg
    sp, dep, split = rec["species"][sl], rec["depth"][sl], rec["split"][sl]
    g, f, o = tax.species_genus[sp], tax.species_family[sp], tax.species_order[sp]
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(99, sl.start)))
    reads = genome.assemble_reads(world.haplotypes[rec["haplotype"][sl]], rec["read_start"][sl],
                                  rec["read_length"][sl], rec["has_n"][sl], rng)
    codes, years = rec["_project_codes"].tolist(), [f"-{y}" for y in rec["_project_years"].tolist()]
    proj = rec["project"][sl]
    pid = pc.binary_join_element_wise(_take(codes, proj), pc.cast(pa.array(rec["number"][sl]), pa.string()),
                                      _take(years, proj), "")
    plate, well = rec["slot"][sl] // 96, rec["slot"][sl] % 96
    # BIOUG12345-A01, or CBG-A12345-A01 for a third of the plates
    sid = pc.binary_join_element_wise(_take(["BIOUG", "CBG-A"], (plate % 3 == 0).astype(np.int64)),
                                      pc.cast(pa.array(plate), pa.string()), "")
    sid = pc.binary_join_element_wise(sid, _take(WELLS, well), "-")
    ranks = [tax.species_names, tax.genus_names, tax.family_names, tax.order_names]
    taxon = pc.coalesce(*[_take(r, ids, dep == 4 - k)  # the most specific known rank
                          for k, (r, ids) in enumerate(zip(ranks, (sp, g, f, o)))])
    site = rec["site"][sl]
    provinces = [s[1] for s in names.SITES]
    subfamily = [tax.subfamily_names[i // cfg.genera_per_family] for i in range(len(tax.genus_names))]
    p = record_traits(world, rec, sl)
    p["size_mult"] = rec["size_multiplier"][sl]
    # pixels the specimen would cover at the original resolution
    area = np.rint(body_area_fraction(p) * 65_536 * rec["scale_factor"][sl] ** 2).astype(np.int64)
    n = sp.size
    return {
        "processid": pid, "sampleid": sid, "taxon": taxon,
        "phylum": pa.array(["Arthropoda"] * n, pa.string()), "class": pa.array(["Insecta"] * n, pa.string()),
        "order": _take(tax.order_names, o), "family": _take(tax.family_names, f, dep >= 2),
        "subfamily": _take(subfamily, g, (dep >= 3) & tax.genus_has_subfamily[g]),
        "genus": _take(tax.genus_names, g, dep >= 3), "species": _take(tax.species_names, sp, dep == 4),
        "dna_bin": _take(tax.species_bins, sp, rec["has_bin"][sl]), "dna_barcode": reads,
        "country": _take([s[0] for s in names.SITES], site),
        "province_state": _take(provinces, site, np.array([bool(x) for x in provinces])[site]),
        "coord-lat": pa.array(rec["lat"][sl]), "coord-lon": pa.array(rec["lon"][sl]),
        "image_measurement_value": pa.array(area), "area_fraction": pa.array(rec["area_fraction"][sl]),
        "scale_factor": pa.array(rec["scale_factor"][sl]), "inferred_ranks": pa.array(np.zeros(n, np.uint8)),
        "split": _take(list(SPLIT_CODES), split), "index_bioscan_1M_insect": pa.nulls(n, pa.int64()),
        "chunk": _chunk_column(pid, split),
    }


def truth_columns(world: World, rec: dict[str, np.ndarray], sl: slice, meta: dict[str, pa.Array],
                  has_image: bool) -> dict[str, pa.Array]:
    """The ground-truth parquet columns (documented in :mod:`g2p.data.synth`) for records ``sl``."""
    tax, z = world.tax, world.z
    sp = rec["species"][sl]
    f32 = {k: pa.array(rec[k][sl].astype(np.float32)) for k in ("size_multiplier", *traits.NUISANCE_NAMES)}
    f32["melanism_multiplier"] = pa.array(rec["melanism"][sl].astype(np.float32))
    f32.update({k: pa.array(rec[k][sl]) for k in traits.INDIVIDUAL_NAMES})
    return {
        "processid": meta["processid"], "split": meta["split"], "species_id": pa.array(sp),
        "species_kind": pa.array(tax.species_kind[sp]), "order_id": pa.array(tax.species_order[sp]),
        "family_id": pa.array(tax.species_family[sp]), "genus_id": pa.array(tax.species_genus[sp]),
        "haplotype_id": pa.array(rec["haplotype"][sl]), "read_start": pa.array(rec["read_start"][sl]),
        "read_length": pa.array(rec["read_length"][sl]), "has_n": pa.array(rec["has_n"][sl]),
        "lat": pa.array(rec["lat"][sl]), "lon": pa.array(rec["lon"][sl]), **f32,
        **{f"trait_{k}": pa.array(v.astype(np.float32)) for k, v in record_traits(world, rec, sl).items()},
        "trait_vector": pa.FixedSizeListArray.from_arrays(pa.array(z[sp].reshape(-1)), z.shape[1]),
        "has_image": pa.array(np.full(sp.size, has_image)),
    }


def drawing_parameters(world: World, rec: dict[str, np.ndarray], sl: slice) -> list[dict[str, float]]:
    """Per record of ``sl``: everything :func:`g2p.data.render.draw_specimen` needs."""
    cols = record_traits(world, rec, sl)
    cols["size_mult"] = rec["size_multiplier"][sl]
    cols.update({k: rec[k][sl] for k in (*traits.NUISANCE_NAMES, "damage", "damage_part")})
    keys = list(cols)
    values = [np.asarray(cols[k], dtype=np.float64).tolist() for k in keys]
    return [dict(zip(keys, row)) for row in zip(*values)]


def record_traits(world: World, rec: dict[str, np.ndarray], sl: slice) -> dict[str, np.ndarray]:
    """The decoded traits that draw records ``sl``: their species' with sex and melanism applied."""
    sp = rec["species"][sl]
    return traits.record_traits({k: v[sp] for k, v in world.decoded.items()}, rec["sex"][sl],
                                rec["melanism"][sl], world.cfg)


def family_melanism(truth: Any) -> dict[int, bool]:
    """Which families of a ground-truth table are melanic (some record's ``melanism_multiplier`` is not 1)."""
    m = truth.groupby("family_id")["melanism_multiplier"].min()
    return {int(f): bool(v < 1.0 - 1e-6) for f, v in m.items()}


def moved_record(row: Any, cfg: DataConfig, lat: float, melanic: bool, *, sex: int | None = None,
                 nuisance: dict[str, float] | None = None) -> dict[str, float]:
    """Drawing parameters of ground-truth record ``row`` (a mapping of its columns) as if it had been
    collected at latitude ``lat``: the same species and, unless given, the same sex, pose and light;
    Bergmann size and thermal melanism recomputed for ``lat``. The positive control of the evaluate
    stage's Bergmann test (true renders of a species at the latitudes its generated images were asked for).
    """
    p = {n: float(row[f"trait_{n}"]) for n in traits.TRAIT_NAMES}
    old_sex = int(row["sex"])
    if sex is not None and sex != old_sex:  # back to the species' value, then to the asked-for sex
        for name, rel in traits.MALE.items():
            p[name] = p[name] / (1.0 + rel * cfg.dimorphism * old_sex) * (1.0 + rel * cfg.dimorphism * sex)
    at = np.array([lat], dtype=np.float64)
    p["body_light"] = (p["body_light"] / float(row["melanism_multiplier"])
                       * float(traits.melanism_multiplier(at, np.array([melanic]), cfg)[0]))
    p["size_mult"] = float(traits.size_multiplier(at, cfg)[0])
    p.update({k: float(row[k]) for k in (*traits.NUISANCE_NAMES, "damage", "damage_part")})
    if nuisance is not None:
        p.update({k: float(v) for k, v in nuisance.items()})
    return p
