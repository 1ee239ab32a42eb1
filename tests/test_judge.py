"""The CLIBD-style judge on tiny sizes: it learns, saves exactly, scores sanely, refuses bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from g2p.config import JudgeConfig, preset
from g2p.judge import ImageDNAJudge, Judge, clip_loss, species_retrieval
from g2p.train.judge import augment, train_judge
from g2p.train.loop import Hooks
from tests.fixtures import two_species_arrays

CFG = preset("tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained() -> tuple[Judge, list[float]]:
    torch.manual_seed(0)
    judge = Judge(CFG.judge)
    losses: list[float] = []
    train_judge(judge, two_species_arrays(32), replace(CFG.train_judge, steps=40), genus=["G"] * 32,
                hooks=Hooks(on_step=[lambda step, m: losses.append(m["loss"])]), progress=False)
    return judge, losses


def test_judge_learns_to_separate_two_species(trained: tuple[Judge, list[float]]) -> None:
    judge, losses = trained
    assert losses[-1] < losses[0]
    held_out = two_species_arrays(16, seed=1)  # new individuals (other mutations) of new species bases
    train = two_species_arrays(32)
    # images of species s score higher with their own species' barcodes than with the other species'
    img, dna = judge.embed_images(train.images), judge.embed_barcodes(train.barcode)
    sims = img @ dna.T  # (N, N)
    same = torch.as_tensor(np.equal.outer(train.species, train.species))
    assert sims[same].mean() > sims[~same].mean() + 0.3
    ret = species_retrieval(img, train.species, dna, train.species)
    assert ret["top1"] == 1.0 and ret["chance"] == 0.5
    # same images, unseen barcode bases: no better than its colour cue allows, but still well-formed
    assert judge.score(held_out.images, held_out.barcode).shape == (16,)


def test_score_is_a_cosine_of_unit_embeddings(trained: tuple[Judge, list[float]]) -> None:
    judge, _ = trained
    data = two_species_arrays(8)
    img, dna = judge.embed_images(data.images), judge.embed_barcodes(data.barcode, [1.0] * 8, [2.0] * 8)
    assert img.shape == dna.shape == (8, CFG.judge.embed_dim)
    assert torch.allclose(img.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(dna.norm(dim=1), torch.ones(8), atol=1e-5)
    s = judge.score(data.images, data.barcode)
    assert s.shape == (8,) and bool((s <= 1 + 1e-5).all() and (s >= -1 - 1e-5).all())
    assert torch.allclose(s, (img * dna).sum(-1), atol=1e-6)
    # any square size is resized internally; a batch of one equals its row in a batch
    big = torch.nn.functional.interpolate(data.images.float(), size=48).round().byte()
    assert judge.embed_images(big).shape == (8, CFG.judge.embed_dim)
    assert torch.allclose(judge.embed_images(data.images[:1]), img[:1], atol=1e-5)
    assert isinstance(judge, ImageDNAJudge)  # the protocol a wrapped real CLIBD would satisfy too


def test_save_load_round_trip_is_exact(trained: tuple[Judge, list[float]], tmp_path: Path) -> None:
    judge, _ = trained
    judge.save_pretrained(tmp_path / "judge")
    assert not list((tmp_path / "judge").glob("*.bin")) and not list((tmp_path / "judge").glob("*.pt"))
    loaded = Judge.from_pretrained(tmp_path / "judge")
    assert loaded.cfg == judge.cfg
    for k, v in judge.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    data = two_species_arrays(8)
    assert torch.equal(loaded.score(data.images, data.barcode), judge.score(data.images, data.barcode))
    with pytest.raises(FileNotFoundError, match="directory"):
        Judge.from_pretrained(tmp_path / "nothing")


def test_bad_input_names_the_field(trained: tuple[Judge, list[float]]) -> None:
    judge, _ = trained
    data = two_species_arrays(4)
    with pytest.raises(ValueError, match="images: expected dtype uint8"):
        judge.embed_images(data.images.float())
    with pytest.raises(ValueError, match=r"images: expected shape .* got \(3, 32, 32\)"):
        judge.embed_images(data.images[0])
    with pytest.raises(ValueError, match=r"barcodes\[1\]: .*''"):
        judge.embed_barcodes(["ACGT" * 50, ""])
    with pytest.raises(TypeError, match="barcodes: expected a list"):
        judge.embed_barcodes("ACGTACGT")
    with pytest.raises(ValueError, match="images: 4 images for 3 barcodes"):
        judge.score(data.images, data.barcode[:3])
    with pytest.raises(ValueError, match="latitudes: 1 values for 4 barcodes"):
        judge.embed_barcodes(data.barcode, latitudes=[1.0])
    with pytest.raises(ValueError, match="query_species: 1 species have no key"):
        species_retrieval(torch.randn(2, 4), ["a", "b"], torch.randn(1, 4), ["a"])


def test_dna_tower_ignores_padding_and_bag_variant_runs() -> None:
    torch.manual_seed(0)
    bag = Judge(replace(CFG.judge, dna_layers=0))
    assert bag.dna_tower.encoder is None
    short, long = "ACGTT" * 60, "GATTACA" * 90
    both = bag.embed_barcodes([short, long])
    assert torch.allclose(bag.embed_barcodes([short]), both[:1], atol=1e-5)  # padded in the pair, not alone
    tr = Judge(CFG.judge)
    assert torch.allclose(tr.embed_barcodes([short]), tr.embed_barcodes([short, long])[:1], atol=1e-5)


def test_clip_loss_multi_positive_and_augment_keep_ranges() -> None:
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(np.log(10.0))
    aligned = clip_loss(z, z, scale)
    assert aligned < clip_loss(z, z.roll(1, 0), scale)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isfinite(clip_loss(z, z, scale, labels))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    y = augment(x, g, shift=0.1, color=0.2, blur=1.0)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    assert torch.equal(augment(x, g, shift=0.0, color=0.0, blur=0.0), x)


def test_same_seed_same_judge() -> None:
    data = two_species_arrays(8)
    scores = []
    for _ in range(2):
        torch.manual_seed(0)
        j = Judge(CFG.judge)
        train_judge(j, data, replace(CFG.train_judge, steps=5), genus=["G"] * 8, progress=False)
        scores.append(j.score(data.images, data.barcode))
    assert torch.equal(scores[0], scores[1])


def test_judge_config_presets_and_strictness() -> None:
    assert preset("paper").judge.k == 5 and preset("paper").judge.embed_dim == 768  # CLIBD's width
    assert preset("default").judge == JudgeConfig()
    assert CFG.set("judge.k", 4).judge.k == 4
    from g2p.config import ConfigError

    with pytest.raises(ConfigError, match="judge.embed_dim"):
        CFG.set("judge.embed_dim", "wide")
    with pytest.raises(ConfigError, match="unknown key trait_reader.colour"):
        CFG.override({"trait_reader": {"colour": 1}})
