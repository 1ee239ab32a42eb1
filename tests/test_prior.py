"""Prior renders (``g2p.data.prior``): the trait reader's images of fresh species.

They must be deterministic in the seed (whatever the chunking), look exactly as
a benchmark image of the same parameters does on its way into a model, carry
the targets of the trait vector they were drawn from, come from worlds other
than the benchmark's, and go through the trait reader's trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from g2p.config import preset
from g2p.data import genome, traits
from g2p.data.dataset import load_image
from g2p.data.layout import TRUTH_RELPATH, image_relpath
from g2p.data.prior import (PRIOR_SPAWN_KEY, WORLD_RECORDS, prior_records, prior_set, render_prior, render_record,
                            world_records)
from g2p.data.records import make_world_and_records
from g2p.data.synth import synthesise
from g2p.train.judge import train_trait_reader, with_prior_renders
from g2p.trait_reader import TraitReader, targets_from_ground_truth, targets_from_parameters

CFG = preset("tiny")
DATA = CFG.data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_renders_are_deterministic_and_independent_of_chunking() -> None:
    a_img, a_par = prior_set(DATA, 7, seed=3, size=32)
    chunks = list(render_prior(DATA, 7, seed=3, size=32, chunk=3))
    assert [len(im) for im, _ in chunks] == [3, 3, 1]
    assert torch.equal(a_img, torch.cat([im for im, _ in chunks]))
    for k, v in a_par.items():
        np.testing.assert_array_equal(v, np.concatenate([c[k] for _, c in chunks]), err_msg=k)
    b_img, _ = prior_set(DATA, 7, seed=3, size=32)
    assert torch.equal(a_img, b_img)
    c_img, c_par = prior_set(DATA, 7, seed=4, size=32)
    assert not torch.equal(a_img, c_img) and not np.array_equal(a_par["body_hue"], c_par["body_hue"])


def test_records_span_worlds_and_slice_consistently() -> None:
    n = WORLD_RECORDS + 5
    whole = prior_records(DATA, 0, 0, n)
    part = prior_records(DATA, 0, WORLD_RECORDS - 2, n)
    for k, v in whole.items():
        assert v.shape == (n,), k
        np.testing.assert_array_equal(v[WORLD_RECORDS - 2:], part[k], err_msg=k)
    assert {*traits.TRAIT_NAMES, *traits.NUISANCE_NAMES, "size_mult", "lat"} <= set(whole)
    with pytest.raises(ValueError, match="start, stop"):
        prior_records(DATA, 0, 5, 2)
    with pytest.raises(ValueError, match="n: the number of prior renders"):
        next(render_prior(DATA, -1, 0, 32))


def test_images_have_the_benchmark_shape_and_dtype() -> None:
    images, params = prior_set(DATA, 4, seed=0, size=CFG.vae.image_size)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, CFG.vae.image_size, CFG.vae.image_size)
    assert all(v.shape == (4,) for v in params.values())
    assert int(images.float().std()) > 5  # a drawn specimen, not a blank


def test_targets_are_the_trait_vector_that_was_drawn() -> None:
    """Recomputed from the world's own seed stream: decode(species_traits) of the picked species,
    with each record's sex and thermal melanism applied (the traits that drew the image)."""
    got = world_records(DATA, seed=5, world=1)
    seq = np.random.SeedSequence(5, spawn_key=(PRIOR_SPAWN_KEY, 1))
    r_names, r_traits, r_pick, _, _, _, r_indiv, r_clade = (np.random.default_rng(s) for s in seq.spawn(8))
    tax = genome.build_taxonomy(DATA, r_names)
    decoded = traits.decode(traits.species_traits(tax, DATA, r_traits))
    species = r_pick.integers(0, tax.n_species, WORLD_RECORDS)
    ind = traits.individuals(WORLD_RECORDS, DATA, r_indiv)
    melanic = traits.melanic_families(len(tax.family_names), DATA, r_clade)[tax.species_family[species]]
    mel = traits.melanism_multiplier(got["lat"], melanic, DATA)
    male = ind["sex"] == 1
    assert 0 < male.sum() < WORLD_RECORDS and (mel < 1).any() and (mel == 1).any()
    want = {k: v[species].astype(np.float64) for k, v in decoded.items()}
    for name, rel in traits.MALE.items():
        want[name] = np.where(male, want[name] * (1 + rel * DATA.dimorphism), want[name])
    want["body_light"] = want["body_light"] * mel
    tg = targets_from_parameters(got)
    for name in traits.TRAIT_NAMES:
        np.testing.assert_allclose(got[name], want[name], err_msg=name)
        if name != "size_base":
            np.testing.assert_allclose(tg[name], want[name], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got["damage"], ind["damage"])
    np.testing.assert_allclose(got["size_mult"], traits.size_multiplier(got["lat"], DATA))
    np.testing.assert_allclose(tg["body_size"], got["size_base"] * got["size_mult"], rtol=1e-6)


def test_prior_worlds_are_not_the_benchmarks() -> None:
    world, _ = make_world_and_records(DATA)
    prior = prior_records(DATA, DATA.seed, 0, 2 * WORLD_RECORDS)
    assert not np.isin(prior["body_hue"], world.decoded["body_hue"]).any()


def test_render_matches_a_benchmark_image_of_the_same_parameters(tmp_path: Path) -> None:
    """Drawing parameters of real benchmark records (from its ground truth) render to the very pixels a model
    loads from the benchmark's JPEG, and the two target functions agree."""
    data = dataclasses.replace(DATA, pretrain_records=0)
    synthesise(tmp_path, data)
    gt = pd.read_parquet(tmp_path / TRUTH_RELPATH)
    from g2p.data.layout import METADATA_RELPATH

    meta = pd.read_csv(tmp_path / METADATA_RELPATH, dtype=str).set_index("processid")
    for _, row in gt.head(3).iterrows():
        p = {n: float(row[f"trait_{n}"]) for n in traits.TRAIT_NAMES}
        p.update({n: float(row[n]) for n in traits.NUISANCE_NAMES})
        p["size_mult"] = float(row["size_multiplier"])
        chunk = meta.loc[row["processid"], "chunk"]
        path = tmp_path / image_relpath(row["processid"], row["split"], None if pd.isna(chunk) else chunk)
        real = load_image(path, 32)
        mine = render_record(p, data.image_size, 32)
        # ground truth stores float32 parameters: at most a pixel's rounding apart
        assert np.abs(real.astype(int) - mine.astype(int)).mean() < 1.0
        one = gt[gt["processid"] == row["processid"]]
        t_gt, t_p = targets_from_ground_truth(one), targets_from_parameters({k: np.array([v]) for k, v in p.items()})
        for name in TraitReader.TARGETS:
            np.testing.assert_allclose(t_p[name], t_gt[name], rtol=1e-6, err_msg=name)


def test_trainer_accepts_prior_renders() -> None:
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    real_targets = targets_from_parameters(prior_records(DATA, 99, 0, 6))
    images, targets = with_prior_renders(real, real_targets, 10, DATA, seed=0)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:6], real)
    assert set(targets) == set(TraitReader.TARGETS) and all(v.shape == (16,) for v in targets.values())
    same, _ = with_prior_renders(real, real_targets, 0, DATA, seed=0)
    assert same is real
    reader = TraitReader(CFG.trait_reader)
    state = train_trait_reader(reader, images, targets, dataclasses.replace(CFG.train_trait_reader, steps=3),
                               progress=False)
    assert state.step == 3
    with pytest.raises(ValueError, match="n: the number of prior renders"):
        with_prior_renders(real, real_targets, -1, DATA, seed=0)
    with pytest.raises(ValueError, match="images: 6 images for 16"):
        train_trait_reader(TraitReader(CFG.trait_reader), real, targets, CFG.train_trait_reader, progress=False)
