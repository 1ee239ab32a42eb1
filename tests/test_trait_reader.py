"""The trait reader on a tiny synthetic set: it recovers traits, round-trips exactly, errors are right."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from g2p.config import preset
from g2p.trait_reader import CATEGORICAL, CIRCULAR, CONTINUOUS, TraitReader, targets_from_ground_truth, trait_errors
from g2p.train.judge import train_trait_reader

CFG = preset("tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Images whose square's size is ``body_size``, colour ``body_hue``, corner mark ``antenna_club``."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.6, 1.4, n)
    hue = rng.uniform(0, 1, n)
    club = rng.integers(0, 2, n).astype(np.float64)
    images = np.full((n, 3, 32, 32), 230, dtype=np.uint8)
    for i in range(n):
        half = int(round(6 * size[i]))
        a = 2 * np.pi * hue[i]
        rgb = 127 + 100 * np.array([np.cos(a), np.cos(a - 2.094), np.cos(a + 2.094)])
        images[i, :, 16 - half:16 + half, 16 - half:16 + half] = rgb.astype(np.uint8)[:, None, None]
        if club[i]:
            images[i, :, 2:5, 2:5] = 0  # a dark mark stands for the antenna club
    targets = {name: np.full(n, 0.5) for name in TraitReader.TARGETS}  # constant: nothing to see
    targets.update(body_size=size, body_hue=hue, antenna_club=club,
                   pattern_kind=rng.integers(0, 3, n).astype(np.float64),
                   wing_type=rng.integers(0, 5, n).astype(np.float64))
    return torch.from_numpy(images), targets


@pytest.fixture(scope="module")
def trained() -> TraitReader:
    torch.manual_seed(0)
    reader = TraitReader(CFG.trait_reader)
    images, targets = synthetic_set(96, seed=0)
    train_trait_reader(reader, images, targets, replace(CFG.train_trait_reader, steps=150, batch_size=16),
                       progress=False)
    return reader


def test_reader_recovers_size_hue_and_a_class(trained: TraitReader) -> None:
    images, truth = synthetic_set(48, seed=1)  # held-out images
    pred = trained.predict(images)
    assert set(pred) == set(TraitReader.TARGETS) and all(v.shape == (48,) for v in pred.values())
    err = trait_errors(pred, truth)
    # a constant guess (the mean) is the bar each learnt trait must clear
    size_baseline = np.abs(truth["body_size"] - truth["body_size"].mean()).mean()
    assert err["body_size"].mean() < 0.7 * size_baseline
    assert err["body_hue"].mean() < 0.1  # turns; a constant guess averages 0.25
    assert err["antenna_club"].mean() < 0.2  # error rate; a constant guess is ~0.5
    assert bool(((pred["body_hue"] >= 0) & (pred["body_hue"] < 1)).all())
    assert set(np.unique(pred["wing_type"])) <= set(range(CATEGORICAL["wing_type"]))


def test_save_load_round_trip_is_exact(trained: TraitReader, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path / "reader")
    loaded = TraitReader.from_pretrained(tmp_path / "reader")
    for k, v in trained.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    images, _ = synthetic_set(4, seed=2)
    a, b = trained.predict(images), loaded.predict(images)
    assert all(np.array_equal(a[n], b[n]) for n in TraitReader.TARGETS)


def test_errors_are_circular_for_hues_and_zero_one_for_classes() -> None:
    base = {n: np.zeros(2) for n in TraitReader.TARGETS}
    pred = {**base, "body_hue": np.array([0.95, 0.5]), "wing_type": np.array([1.0, 0.0]),
            "body_size": np.array([1.5, 0.25])}
    err = trait_errors(pred, base)
    assert np.allclose(err["body_hue"], [0.05, 0.5])
    assert np.array_equal(err["wing_type"], [1.0, 0.0])
    assert np.allclose(err["body_size"], [1.5, 0.25])
    with pytest.raises(ValueError, match="body_size"):
        trait_errors({**pred, "body_size": np.zeros(3)}, base)


def test_targets_cover_every_trait_and_body_size_is_base_times_multiplier() -> None:
    import pandas as pd

    from g2p.data.traits import TRAIT_NAMES

    row = {f"trait_{n}": [0.5] for n in TRAIT_NAMES} | {"trait_size_base": [1.2], "size_multiplier": [1.5]}
    t = targets_from_ground_truth(pd.DataFrame(row))
    assert set(t) == set(TraitReader.TARGETS) and np.isclose(t["body_size"][0], 1.8)
    assert set(CONTINUOUS) | set(CIRCULAR) | set(CATEGORICAL) == set(TraitReader.TARGETS)
    assert "size_base" not in TraitReader.TARGETS  # not visible alone: body_size is


def test_bad_input_names_the_field() -> None:
    reader = TraitReader(CFG.trait_reader)
    images, targets = synthetic_set(4, seed=0)
    with pytest.raises(ValueError, match="images: expected dtype uint8"):
        reader.predict(images.float())
    with pytest.raises(ValueError, match="targets: missing"):
        train_trait_reader(reader, images, {"body_size": targets["body_size"]}, CFG.train_trait_reader,
                           progress=False)
    with pytest.raises(ValueError, match=r"targets\['wing_type'\]: classes must be in 0..4"):
        train_trait_reader(reader, images, {**targets, "wing_type": np.full(4, 7.0)}, CFG.train_trait_reader,
                           progress=False)


def test_genus_oracle_is_the_genus_mean_of_the_training_records() -> None:
    import pandas as pd

    from g2p.trait_reader import TRAIT_GROUPS, TraitReader, genus_oracle

    assert sorted(n for names in TRAIT_GROUPS.values() for n in names) == sorted(TraitReader.TARGETS)
    cols = {f"trait_{n}": [0.0] * 5 for n in TraitReader.TARGETS if n != "body_size"}
    truth = pd.DataFrame({"processid": list("abcde"), "split": ["train", "train", "train", "test", "test"],
                          "genus_id": [1, 1, 2, 1, 3], "size_multiplier": [1.0] * 5, "trait_size_base": [1.0] * 5,
                          **cols}).set_index("processid")
    truth["trait_body_light"] = [0.2, 0.4, 0.9, 0.0, 0.0]
    truth["trait_body_hue"] = [0.95, 0.15, 0.5, 0.0, 0.0]  # circular: the mean of 0.95 and 0.15 is 0.05
    truth["trait_wing_type"] = [2, 2, 4, 0, 0]
    o = genus_oracle(truth, ["d", "e", "a"])
    assert o["body_light"].tolist() == pytest.approx([0.3, 0.5, 0.3])  # genus 3 has no training record: all
    assert o["body_hue"][0] == pytest.approx(0.05) and o["wing_type"][0] == 2
