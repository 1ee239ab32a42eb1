"""The synthetic benchmark: layout, splits, barcodes, traits, images, determinism.

Everything runs on the ``tiny`` preset (or smaller hand-made configs), so the
whole file takes seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from g2p.config import DataConfig, preset
from g2p.data import genome, traits
from g2p.data.layout import COLUMN_DTYPES, COLUMNS, METADATA_RELPATH, TRUTH_RELPATH, chunk_for, image_relpath
from g2p.data.normalise import normalise_barcode
from g2p.data.render import draw_specimen
from g2p.data.synth import synthesise

SEEN, UNSEEN = ("train", "val", "test"), ("key_unseen", "val_unseen", "test_unseen")


def _tiny(**kw) -> DataConfig:
    return dataclasses.replace(preset("tiny").data, **kw)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesise(root, _tiny(heldout_species_per_genus=1, other_heldout_per_species=2))
    return root


@pytest.fixture(scope="module")
def meta(tiny_root: Path) -> pd.DataFrame:
    return pd.read_csv(tiny_root / METADATA_RELPATH, dtype=COLUMN_DTYPES)


@pytest.fixture(scope="module")
def truth(tiny_root: Path) -> pd.DataFrame:
    return pd.read_parquet(tiny_root / TRUTH_RELPATH)


def test_columns_and_value_conventions(tiny_root: Path, meta: pd.DataFrame) -> None:
    header = (tiny_root / METADATA_RELPATH).read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    assert meta["processid"].is_unique
    assert meta["processid"].str.fullmatch(r"[A-Z]{4,5}\d+-(19|2[0-3])").all()
    assert meta["sampleid"].str.fullmatch(r"(BIOUG|CBG-A)\d{5}-[A-H](0[1-9]|1[0-2])").all()
    assert meta["sampleid"].is_unique
    assert (meta["phylum"] == "Arthropoda").all() and (meta["class"] == "Insecta").all()
    assert meta["dna_bin"].dropna().str.fullmatch(r"BOLD:A[A-Z]{2}\d{4}").all()
    assert meta["order"].notna().all()
    assert meta["coord-lat"].between(-90, 90).all() and meta["coord-lon"].between(-180, 180).all()
    assert meta["country"].notna().all()
    assert meta["index_bioscan_1M_insect"].isna().all() and (meta["inferred_ranks"] == 0).all()
    # taxon is the most specific known rank
    ranks = ["species", "genus", "family", "order"]
    most_specific = meta[ranks].bfill(axis=1).iloc[:, 0]
    assert (meta["taxon"].astype(str) == most_specific.astype(str)).all()


def test_splits_follow_bioscan5m(meta: pd.DataFrame, truth: pd.DataFrame) -> None:
    cfg = _tiny()
    by = meta.groupby("split", observed=True)
    seen = meta[meta["split"].isin(SEEN)]
    unseen = meta[meta["split"].isin(UNSEEN)]
    pretrain = meta[meta["split"] == "pretrain"]
    assert len(pretrain) == cfg.pretrain_records and pretrain["species"].isna().all()
    # seen species: scientific binomials; unseen: placeholders with the genus known
    assert seen["species"].str.fullmatch(r"[A-Z][a-z]+ [a-z]+").all()
    assert unseen["species"].str.fullmatch(r"[A-Z][a-z]+ sp\. \d[A-Z]{3}").all()
    assert (unseen["species"].str.split(" ").str[0] == unseen["genus"]).all()
    assert set(seen["species"]).isdisjoint(set(unseen["species"]))
    held = meta[meta["split"] == "other_heldout"]
    assert len(held) > 0 and held["species"].str.contains(" sp. ", regex=False).all()
    # test is flat over species, and covers every seen species
    assert by.get_group("test")["species"].astype(str).value_counts().nunique() == 1
    test_species = set(by.get_group("test")["species"].astype(str))
    assert test_species == set(by.get_group("train")["species"].astype(str))
    # val/test haplotypes and barcodes never occur in train
    t = truth.set_index("processid").loc[meta["processid"]]
    train_haps = set(t.loc[t["split"] == "train", "haplotype_id"])
    norm = meta["dna_barcode"].map(lambda s: normalise_barcode(s).strip("N"))
    train_codes = set(norm[meta["split"] == "train"])
    for s in ("val", "test"):
        assert train_haps.isdisjoint(t.loc[t["split"] == s, "haplotype_id"])
        assert train_codes.isdisjoint(norm[meta["split"] == s])
    # pretrain reads no unseen-species barcode
    assert not (t.loc[t["split"] == "pretrain", "species_kind"] == genome.KIND_UNSEEN).any()


def test_images_at_official_paths(tiny_root: Path, meta: pd.DataFrame) -> None:
    cfg = _tiny()
    for pid, split, chunk in zip(meta["processid"], meta["split"], meta["chunk"]):
        assert (chunk if isinstance(chunk, str) else "") == chunk_for(pid, split)
        path = tiny_root / image_relpath(pid, split)
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (cfg.image_size, cfg.image_size) and im.mode == "RGB"
    n_files = sum(1 for _ in (tiny_root / "bioscan5m/images").rglob("*.jpg"))
    assert n_files == len(meta)


def test_barcodes_look_like_insect_coi(meta: pd.DataFrame, truth: pd.DataFrame) -> None:
    cfg = _tiny()
    codes = meta["dna_barcode"]
    assert codes.str.fullmatch(r"[ACGTN]+").all()
    lengths = codes.str.len()
    assert lengths.between(cfg.barcode_length - cfg.barcode_length_jitter,
                           cfg.barcode_length + cfg.barcode_length_jitter).all()
    joined = "".join(codes).replace("N", "")
    at = (joined.count("A") + joined.count("T")) / len(joined)
    assert 0.62 <= at <= 0.74
    has_n = codes.str.contains("N")
    assert (has_n == truth.set_index("processid").loc[meta["processid"], "has_n"].to_numpy()).all()
    assert (codes[has_n].map(lambda s: s.count("N") / len(s)) <= 0.1).all()


def test_barcode_gap_and_codon_positions() -> None:
    cfg = dataclasses.replace(preset("default").data, num_orders=2, families_per_order=2)
    rng = np.random.default_rng(0)
    tax = genome.build_taxonomy(cfg, rng)
    geom = genome.read_geometry(cfg)
    sp_seq = genome.species_sequences(tax, cfg, geom, rng)
    owner = np.repeat(np.arange(tax.n_species), 6)
    hap = genome.haplotypes(sp_seq, owner, cfg, geom, rng)[:, geom.core_lo: geom.core_hi]
    d = (hap[:, None, :] != hap[None, :, :]).mean(axis=2)
    same_sp = owner[:, None] == owner[None, :]
    same_genus = tax.species_genus[owner][:, None] == tax.species_genus[owner][None, :]
    within = d[same_sp & ~np.eye(len(owner), dtype=bool)]
    between = d[same_genus & ~same_sp]
    assert within.max() < between.min()  # the barcode gap
    assert within.mean() < 0.02 < 0.03 < between.mean()
    # third codon positions vary most, second least
    codon = (np.arange(geom.core_lo, geom.core_hi) - geom.primer) % 3
    var = (sp_seq[:, geom.core_lo: geom.core_hi] != sp_seq[0, geom.core_lo: geom.core_hi]).mean(axis=0)
    by_pos = [var[codon == k].mean() for k in range(3)]
    assert by_pos[2] > by_pos[0] > by_pos[1]


def test_traits_inherit_down_the_tree() -> None:
    cfg = preset("default").data
    rng = np.random.default_rng(1)
    tax = genome.build_taxonomy(cfg, rng)
    z = traits.species_traits(tax, cfg, rng)
    dec = traits.decode(z)
    colour = np.stack([np.cos(2 * np.pi * dec["body_hue"]), np.sin(2 * np.pi * dec["body_hue"]),
                       dec["body_light"], dec["body_sat"]], 1)
    d = np.linalg.norm(colour[:, None] - colour[None], axis=2)
    same_fam = tax.species_family[:, None] == tax.species_family[None, :]
    same_order = tax.species_order[:, None] == tax.species_order[None, :]
    off = ~np.eye(tax.n_species, dtype=bool)
    assert d[same_fam & off].mean() < d[same_order & ~same_fam].mean() < d[~same_order].mean()
    # species of one family never share (pattern hue, wing tint, pattern count)
    key = np.stack([np.round(dec["pattern_hue"], 3), np.round(dec["wing_hue"], 3), dec["pattern_count"]], 1)
    for f in range(len(tax.family_names)):
        k = key[tax.species_family == f]
        assert len(np.unique(k, axis=0)) == len(k)
        assert len(np.unique(dec["pattern_count"][tax.species_family == f])) >= min(len(k), 3)


def test_bergmann_size_and_truth_columns(meta: pd.DataFrame, truth: pd.DataFrame) -> None:
    cfg = _tiny()
    assert list(truth["processid"]) == list(meta["processid"])
    expected = 1 + cfg.bergmann_coefficient * np.abs(meta["coord-lat"].to_numpy())
    np.testing.assert_allclose(truth["size_multiplier"], expected, rtol=1e-5)
    for name in traits.TRAIT_NAMES:
        assert f"trait_{name}" in truth
    assert len(truth["trait_vector"].iloc[0]) == len(traits.TRAIT_NAMES)
    assert set(traits.NUISANCE_NAMES) <= set(truth.columns)
    # one trait vector per species
    assert (truth.groupby("species_id")["trait_body_hue"].nunique() == 1).all()


def test_individuals_melanism_and_long_tail() -> None:
    """The harder-than-before knobs (DataConfig): sexes, damage, thermal melanism by clade, a long tail;
    each off at 0, and the truth columns carry what drew each record."""
    from g2p.data.records import S, make_world_and_records, record_traits

    cfg = preset("default").data
    world, rec = make_world_and_records(cfg)
    tr = record_traits(world, rec, slice(None))
    sp, male = rec["species"], rec["sex"] == 1
    dec = {k: v[sp] for k, v in world.decoded.items()}
    assert 0.45 < male.mean() < 0.55
    np.testing.assert_allclose(tr["size_base"][male], dec["size_base"][male] * 0.88)
    np.testing.assert_allclose(tr["antenna_length"][male], dec["antenna_length"][male] * 1.35)
    np.testing.assert_array_equal(tr["size_base"][~male], dec["size_base"][~male])
    assert abs((rec["damage"] > 0).mean() - cfg.damage_fraction) < 0.02
    assert set(np.unique(rec["damage"])) == {0, 1, 2, 3}
    # melanism: exactly half the families, darker with |lat| there and nowhere else
    assert world.melanic.sum() == len(world.melanic) // 2
    melanic = world.melanic[world.tax.species_family[sp]]
    lat = np.abs(rec["lat"])
    np.testing.assert_allclose(rec["melanism"][melanic], 1 - cfg.melanism_coefficient * lat[melanic])
    assert (rec["melanism"][~melanic] == 1).all()
    np.testing.assert_allclose(tr["body_light"], dec["body_light"] * rec["melanism"])
    # several unseen species per genus, and a long tail of train records per species
    unseen = np.unique(sp[rec["split"] == S["test_unseen"]])
    assert np.bincount(world.tax.species_genus[unseen]).max() == cfg.unseen_species_per_genus == 3
    n_train = np.bincount(sp[rec["split"] == S["train"]])
    n_train = n_train[n_train > 0]
    assert n_train.max() > 4 * np.median(n_train) and n_train.min() < np.median(n_train) / 4
    # all off: the species' traits draw every record, as before the knobs
    off = dataclasses.replace(cfg, dimorphism=0.0, damage_fraction=0.0, melanism_coefficient=0.0)
    world0, rec0 = make_world_and_records(off)
    tr0 = record_traits(world0, rec0, slice(None))
    for k, v in world0.decoded.items():
        np.testing.assert_array_equal(tr0[k], v[rec0["species"]], err_msg=k)
    assert (rec0["damage"] == 0).all()
    with pytest.raises(Exception, match="data.damage_fraction: 1.5"):
        dataclasses.replace(cfg, damage_fraction=1.5)


def test_damage_changes_the_drawing_only_where_it_says() -> None:
    from g2p.data.records import drawing_parameters, make_world_and_records

    world, rec = make_world_and_records(preset("default").data)
    p = next(q for q in drawing_parameters(world, rec, slice(0, 200)) if q["wing_type"] in (1, 2) and q["damage"] == 0)
    intact = np.asarray(draw_specimen(p, 128), dtype=np.float32)
    for code in (1, 2, 3):
        hurt = np.asarray(draw_specimen({**p, "damage": code, "damage_part": 1}, 128), dtype=np.float32)
        diff = np.abs(hurt - intact).max(axis=2) > 20
        assert 3 < diff.sum() < 0.1 * diff.size, code  # a part is gone, the specimen is not


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesise(a, _tiny())
    synthesise(b, _tiny())
    synthesise(c, _tiny(seed=1))
    da, db = _digest(a), _digest(b)
    assert len(da) > 10 and da == db
    assert _digest(c) != da


def test_metadata_only_scale_path(tmp_path: Path) -> None:
    cfg = _tiny(metadata_only=True, heldout_species_per_genus=1, other_heldout_per_species=3,
                pretrain_records=500)
    summary = synthesise(tmp_path, cfg)
    assert summary["images"] == 0 and not (tmp_path / "bioscan5m/images").exists()
    df = pd.read_csv(tmp_path / METADATA_RELPATH, dtype=COLUMN_DTYPES)
    assert len(df) == summary["records"] == sum(summary["splits"].values())
    assert summary["splits"]["other_heldout"] == 4 * 3
    assert not pd.read_parquet(tmp_path / TRUTH_RELPATH, columns=["has_image"])["has_image"].any()


def test_large_preset_is_bioscan5m_sized() -> None:
    cfg = preset("large").data
    assert cfg.metadata_only
    n_g = cfg.num_orders * cfg.families_per_order * cfg.genera_per_family
    rows = cfg.pretrain_records + n_g * (
        cfg.species_per_genus * (cfg.train_per_species + cfg.val_per_species + cfg.test_per_species)
        + cfg.unseen_species_per_genus * (cfg.key_unseen_per_species + cfg.val_unseen_per_species
                                          + cfg.test_unseen_per_species)
        + cfg.heldout_species_per_genus * cfg.other_heldout_per_species)
    assert 5.0e6 < rows < 5.3e6


def test_images_are_light_specimens(tiny_root: Path, meta: pd.DataFrame) -> None:
    arr = np.stack([np.asarray(Image.open(tiny_root / image_relpath(p, s)), dtype=np.float32) / 255
                    for p, s in zip(meta["processid"][:30], meta["split"][:30])])
    assert 0.68 < arr.mean() < 0.84  # BIOSCAN's cropped images average ~0.76
    border = np.concatenate([arr[:, :3].reshape(-1, 3), arr[:, -3:].reshape(-1, 3)])
    centre = arr[:, 28:36, 28:36].reshape(-1, 3)
    assert border.mean() > centre.mean() + 0.1  # a darker specimen on a light background


def _params(truth_row: pd.Series) -> dict[str, float]:
    p = {name: float(truth_row[f"trait_{name}"]) for name in traits.TRAIT_NAMES}
    p.update({k: float(truth_row[k]) for k in (*traits.NUISANCE_NAMES, "damage", "damage_part")})
    p["size_mult"] = float(truth_row["size_multiplier"])
    return p


def test_image_redraws_from_ground_truth(tiny_root: Path, truth: pd.DataFrame) -> None:
    """The parquet holds everything that drew an image: redrawing gives the same picture."""
    row = truth.iloc[0]
    redrawn = np.asarray(draw_specimen(_params(row), 64), dtype=np.float32)
    with Image.open(tiny_root / image_relpath(row["processid"], row["split"])) as im:
        stored = np.asarray(im, dtype=np.float32)
    assert np.abs(redrawn - stored).mean() < 3.0  # JPEG loss only
    other = truth[truth["species_id"] != row["species_id"]].iloc[0]
    assert np.abs(np.asarray(draw_specimen(_params(other), 64), dtype=np.float32) - stored).mean() > 3.0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16), st.integers(638, 678), st.booleans()), min_size=1, max_size=12),
       st.integers(0, 2**32 - 1))
def test_reads_are_template_windows(windows: list[tuple[int, int, bool]], seed: int) -> None:
    cfg = DataConfig()
    geom = genome.read_geometry(cfg)
    rng = np.random.default_rng(seed)
    start = np.array([w[0] for w in windows], dtype=np.int32)
    length = np.minimum(np.array([w[1] for w in windows], dtype=np.int32), geom.length - start)
    with_n = np.array([w[2] for w in windows])
    tmpl = np.repeat(genome.root_sequence(geom, rng)[None], len(windows), axis=0)
    reads = genome.assemble_reads(tmpl.copy(), start, length, with_n, rng).to_pylist()
    for r, s, n, wn, t in zip(reads, start, length, with_n, tmpl):
        assert len(r) == n
        assert ("N" in r) == wn
        ref = t[s: s + n].tobytes().decode()
        assert all(a == b or a == "N" for a, b in zip(r, ref))


def test_nuisance_zero_is_a_fixed_pose() -> None:
    cfg = dataclasses.replace(_tiny(), nuisance=0.0)
    v = traits.nuisance(5, cfg, np.random.default_rng(0))
    assert all(np.all(v[k] == 0) for k in ("pose_deg", "offset_x", "offset_y", "light_warmth", "bg_tone"))
    assert np.all(v["light_gain"] == 1)


def test_cli_synth(tmp_path: Path) -> None:
    from pipelines.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--preset", "tiny", "--seed", "3", "--quiet"]) == 0
    assert (tmp_path / METADATA_RELPATH).exists() and (tmp_path / TRUTH_RELPATH).exists()
    assert re.search(r"\d", (tmp_path / METADATA_RELPATH).read_text().splitlines()[1])
