"""Issue 15's judge for unseen species: genus batches (hard negatives), the unseen species' reference records
(``key_unseen``) in its training data, species decided among all seen and unseen species, and a benchmark
with several unseen species per genus."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from g2p.config import ConfigError, JudgeConfig, preset
from g2p.data.dataset import Arrays, concat_arrays, epoch_batches
from g2p.evaluation.metrics import all_species_prototypes, same_genus_negatives, species_hits, species_prototypes
from g2p.judge import Judge
from g2p.train.judge import _batches, genus_epoch_batches, genus_groups, train_judge
from g2p.train.loop import Hooks

CFG = preset("tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(genera: int = 6, seen: int = 3, per_seen: int = 12, unseen: int = 1, per_unseen: int = 4,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(species, genus) of a train + key_unseen-like set: per genus, seen species of varying counts and
    unseen ones with few records, in a shuffled order."""
    rng = np.random.default_rng(seed)
    sp, ge = [], []
    for g in range(genera):
        for s in range(seen):
            n = int(rng.integers(per_seen // 2, per_seen * 2))
            sp += [f"G{g} s{s}"] * n
            ge += [f"G{g}"] * n
        for u in range(unseen):
            sp += [f"G{g} sp. U{u}"] * per_unseen
            ge += [f"G{g}"] * per_unseen
    order = rng.permutation(len(sp))
    return np.array(sp, dtype=object)[order], np.array(ge, dtype=object)[order]


def _mate_share(batches: list[np.ndarray], species: np.ndarray, genus: np.ndarray, unseen_only: bool = False) -> float:
    """Share of batch records (those of unseen species ' sp. ' only, if asked) whose batch holds another
    species of their genus."""
    hit = n = 0
    for b in batches:
        for i in b:
            if unseen_only and " sp. " not in str(species[i]):
                continue
            n += 1
            hit += bool(np.any((genus[b] == genus[i]) & (species[b] != species[i])))
    return hit / n


# ----------------------------------------------------------------------------
# genus batches
# ----------------------------------------------------------------------------


def test_genus_batches_hold_genus_mates_and_are_deterministic() -> None:
    sp, ge = _records(genera=24)
    batches = genus_epoch_batches(sp, ge, 16, seed=3, epoch=0, species_per_group=3, records_per_species=2)
    assert batches and all(len(b) == 16 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat) and len(flat) > len(sp) - 16  # each record once, tail < a batch
    for b in batches:  # every batch holds 2+ species of some genus
        assert any(len(set(sp[b][ge[b] == g])) >= 2 for g in set(ge[b]))
    assert _mate_share(batches, sp, ge) > 0.85
    random = list(epoch_batches(len(sp), 16, 3, 0))
    assert _mate_share(batches, sp, ge) > _mate_share(random, sp, ge) + 0.3
    again = genus_epoch_batches(sp, ge, 16, seed=3, epoch=0, species_per_group=3, records_per_species=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = genus_epoch_batches(sp, ge, 16, seed=3, epoch=1, species_per_group=3, records_per_species=2)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))  # reshuffled per epoch
    # the unseen species (few records) train beside their seen genus-mates
    assert _mate_share(batches, sp, ge, unseen_only=True) > 0.85


def test_genus_groups_interleave_species_and_keep_odd_records_apart() -> None:
    sp = np.array(["a1", "a1", "a1", "a2", "a2", "a2", "b1", "", "c1", "c1"], dtype=object)
    ge = np.array(["A", "A", "A", "A", "A", "A", "B", "", "", ""], dtype=object)
    groups = genus_groups(sp, ge, 2, 2, np.random.default_rng(0))
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(sp)))
    for g in groups:
        names = sp[g].tolist()
        assert len(set(ge[g].tolist())) == 1 or names == [""]  # one genus per group
        if len(set(names)) == 2:  # interleaved: a group cut at a batch edge keeps two species per part
            assert names[0] != names[1]
    assert [sp[g].tolist() for g in groups if 7 in g] == [[""]]  # unlabelled: alone
    assert {tuple(sp[g].tolist()) for g in groups if 8 in g} == {("c1", "c1")}  # unknown genus: its own
    with pytest.raises(ValueError, match="genus: 3 values for 10 records"):
        genus_groups(sp, ge[:3], 2, 2, np.random.default_rng(0))


def test_genus_batches_rank_shards_are_disjoint_and_resume() -> None:
    sp, ge = _records(seed=1)
    kw = dict(species_per_group=3, records_per_species=2)
    shards = [genus_epoch_batches(sp, ge, 8, 5, 0, rank, 2, **kw) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) > 0  # same number of steps on every rank (DDP)
    seen = [set(np.concatenate(s).tolist()) for s in shards]
    assert not seen[0] & seen[1]
    # global batch t = rank 0's t-th batch then rank 1's: the one-rank stream's 16-record batches
    single = genus_epoch_batches(sp, ge, 16, 5, 0, **kw)
    for t in range(len(single)):
        assert np.array_equal(np.concatenate([shards[0][t], shards[1][t]]), single[t])
    # fewer records than a global batch: one smaller batch per rank, still disjoint
    tiny = [genus_epoch_batches(sp[:10], ge[:10], 64, 5, 0, rank, 2, **kw) for rank in range(2)]
    assert [len(t) for t in tiny] == [1, 1] and not set(tiny[0][0].tolist()) & set(tiny[1][0].tolist())
    # resumable the way the plain batches are: skipping the steps trained on gives the same stream
    tcfg = replace(CFG.train_judge, batch_size=16, seed=5)

    def make(epoch: int, per_rank: int) -> list[np.ndarray]:
        return genus_epoch_batches(sp, ge, per_rank, tcfg.seed, epoch, 1, 2, **kw)

    full = _batches(len(sp), tcfg, 1, 2, None, make)
    head = [next(full) for _ in range(len(shards[1]) + 3)]  # past an epoch boundary
    resumed = _batches(len(sp), tcfg, 1, 2, {"step": 4}, make)
    assert all(np.array_equal(next(resumed), b) for b in head[4:])
    assert np.array_equal(head[0], shards[1][0])


def test_judge_config_knobs_are_typed_and_refuse_evaluation_splits() -> None:
    assert JudgeConfig().extra_splits == ("key_unseen",) and JudgeConfig().batch_species_per_genus == 3
    assert preset("default").judge.batch_species_per_genus > 0  # genus batches on by default
    with pytest.raises(ConfigError, match="judge.extra_splits: 'test_unseen'"):
        CFG.set("judge.extra_splits", ["key_unseen", "test_unseen"])
    with pytest.raises(ConfigError, match="judge.extra_splits: 'val'"):
        JudgeConfig(extra_splits=("val",))
    with pytest.raises(ConfigError, match="judge.batch_species_per_genus: 1"):
        CFG.set("judge.batch_species_per_genus", 1)
    with pytest.raises(ConfigError, match="judge.batch_records_per_species: 0"):
        CFG.set("judge.batch_records_per_species", 0)
    assert CFG.set("judge.batch_species_per_genus", 0).judge.batch_species_per_genus == 0


# ----------------------------------------------------------------------------
# training on the training split plus the unseen species' reference records
# ----------------------------------------------------------------------------


def _species_arrays(species: list[str], per_species: int, seed: int) -> Arrays:
    """Records of ``species``: barcodes mutated from one base per species, images coloured per species."""
    rng = np.random.default_rng(seed)
    barcodes, images, names = [], [], []
    for s, name in enumerate(species):
        base = "".join(rng.choice(list("ACGT"), 600))
        for _ in range(per_species):
            seq = list(base)
            for p in rng.choice(600, 6, replace=False):
                seq[p] = "ACGT"[rng.integers(4)]
            barcodes.append("".join(seq))
            img = np.full((3, 32, 32), 200, dtype=np.uint8)
            img[s % 3, 4 + 4 * (s // 3):20 + 4 * (s // 3), 8:24] = 30
            images.append(img)
            names.append(name)
    n = len(barcodes)
    return Arrays(processid=np.array([f"{seed}-{i}" for i in range(n)]), barcode=barcodes,
                  lat=torch.zeros(n), lon=torch.zeros(n), has_place=torch.zeros(n, dtype=torch.bool),
                  species=np.array(names, dtype=object), images=torch.from_numpy(np.stack(images)))


def test_train_judge_on_genus_batches_with_key_unseen_records() -> None:
    seen = _species_arrays(["A a", "A b", "B a", "B b"], 6, seed=0)  # two genera, two seen species each
    key_unseen = _species_arrays(["A sp. 1", "B sp. 1"], 3, seed=1)  # one unseen species per genus
    data = concat_arrays([seen, key_unseen])
    genus = [str(s).split()[0] for s in data.species]
    assert len(data) == 30 and data.images.shape == (30, 3, 32, 32)
    tcfg = replace(CFG.train_judge, steps=4, batch_size=8, warmup_steps=1, log_every=1)
    torch.manual_seed(0)
    judge = Judge(CFG.judge)
    assert judge.cfg.batch_species_per_genus == 3
    # the batches this configuration draws put genus-mates, unseen ones included, side by side
    batches = genus_epoch_batches(data.species, genus, 8, tcfg.seed, 0, species_per_group=3,
                                  records_per_species=judge.cfg.batch_records_per_species)
    for b in batches:
        assert len(b) == 8 and _mate_share([b], data.species, np.asarray(genus, dtype=object)) >= 0.75
    assert any(" sp. " in str(data.species[i]) for b in batches for i in b)
    logged: list[dict] = []
    train_judge(judge, data, tcfg, genus=genus, progress=False,
                hooks=Hooks(on_step=[lambda step, m: logged.append(dict(m))]))
    assert len(logged) == 4 and all(np.isfinite(m["loss"]) for m in logged)
    with pytest.raises(ValueError, match="genus: judge.batch_species_per_genus=3"):
        train_judge(Judge(CFG.judge), data, tcfg, progress=False)
    with pytest.raises(ValueError, match="genus: 3 values for 30 records"):
        train_judge(Judge(CFG.judge), data, tcfg, genus=genus[:3], progress=False)
    plain = Judge(replace(CFG.judge, batch_species_per_genus=0))  # random batches need no genus
    train_judge(plain, data, replace(tcfg, steps=1), progress=False)
    with pytest.raises(ValueError, match="parts: images of different shapes"):
        concat_arrays([seen, _resized(key_unseen, 16)])


def _resized(a: Arrays, size: int) -> Arrays:
    small = torch.nn.functional.interpolate(a.images.float(), size=size).round().byte()
    return dataclasses.replace(a, images=small)


# ----------------------------------------------------------------------------
# species decided among all seen and unseen species
# ----------------------------------------------------------------------------


def test_all_species_prototypes_decide_among_every_split() -> None:
    # seen species "G a" and its unseen congener "G sp. 1" have close barcode embeddings; the unseen
    # species' image lies nearer the seen congener: a hit against its own split, a miss among all species
    e = {"seen": np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
         "unseen": np.array([[0.8, 0.6, 0.0]])}
    sp = {"seen": np.array(["G a", "G a", "H a"], dtype=object), "unseen": np.array(["G sp. 1"], dtype=object)}
    image = np.array([[0.95, 0.3, 0.0]])
    names, protos = species_prototypes(e["unseen"], sp["unseen"])
    assert species_hits(image, ["G sp. 1"], names, protos).tolist() == [1.0]  # per split: passes
    names, protos = all_species_prototypes(e, sp)
    assert names.tolist() == ["G a", "G sp. 1", "H a"] and protos.shape == (3, 3)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1.0)
    assert species_hits(image, ["G sp. 1"], names, protos).tolist() == [0.0]  # among all: the truth loses
    assert species_hits(np.array([[1.0, 0.0, 0.0]]), ["G a"], names, protos).tolist() == [1.0]
    # a species in both splits is one candidate, its barcodes pooled
    both = all_species_prototypes({"x": np.array([[1.0, 0.0]]), "y": np.array([[0.0, 1.0]])},
                                  {"x": ["s"], "y": ["s"]})
    assert both[0].tolist() == ["s"] and np.allclose(both[1], [[2 ** -0.5, 2 ** -0.5]])
    with pytest.raises(ValueError, match="species: splits"):
        all_species_prototypes(e, {"seen": sp["seen"]})
    with pytest.raises(ValueError, match=r"species\['unseen'\]: 2 names for 1 barcode embeddings"):
        all_species_prototypes(e, {**sp, "unseen": ["u", "v"]})


# ----------------------------------------------------------------------------
# a benchmark with 3 unseen species per genus, end to end through the pure parts
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_unseen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from g2p.data.layout import COLUMN_DTYPES, METADATA_RELPATH
    from g2p.data.synth import synthesise

    root = tmp_path_factory.mktemp("unseen3")
    synthesise(root / "data", dataclasses.replace(CFG.data, unseen_species_per_genus=3))
    df = pd.read_csv(root / "data" / METADATA_RELPATH, dtype=COLUMN_DTYPES)
    df.to_parquet(root / "valid.parquet")  # every synthetic record is valid (the validation stage's output)
    return root / "data", root / "valid.parquet"


def test_three_unseen_species_per_genus(three_unseen: tuple[Path, Path]) -> None:
    from pipelines.evaluate import select_barcodes
    from pipelines.train_judge import judge_training_data, load_split

    root, valid = three_unseen
    df = pd.read_parquet(valid)
    genera = df.loc[df["split"] == "train", "genus"].nunique()
    for split in ("key_unseen", "val_unseen", "test_unseen"):
        rows = df[df["split"] == split]
        per_genus = rows.groupby("genus")["species"].nunique()
        assert len(per_genus) == genera and (per_genus == 3).all(), (split, per_genus.to_dict())
    # evaluate's barcodes: every unseen species, so 3 per genus
    tu = df[df["split"] == "test_unseen"].reset_index(drop=True)
    sel = select_barcodes(tu["species"].to_numpy(dtype=object), 1)
    assert (tu.loc[sel].groupby("genus")["species"].nunique() == 3).all()
    # the threshold's negatives: every val / val_unseen record gets a genus-mate of another species
    held = df[df["split"].isin(["val", "val_unseen"])]
    neg, same = same_genus_negatives(held["species"].to_numpy(dtype=object), held["genus"].to_numpy(dtype=object))
    assert same.all() and (held["genus"].to_numpy()[neg] == held["genus"].to_numpy()).all()
    # the judge's training data: train + key_unseen with genera; its batches mix the unseen with their congeners
    train = load_split(valid, root, "train", 32)
    data, genus = judge_training_data(train, valid, root, ["key_unseen"])
    assert len(data) == len(train) + (df["split"] == "key_unseen").sum() and all(genus)
    assert data.images.shape[-1] == 32 and set(data.species) >= set(df.loc[df["split"] == "key_unseen", "species"])
    batches = genus_epoch_batches(data.species, genus, 8, 0, 0, species_per_group=3, records_per_species=2)
    assert _mate_share(batches, data.species, genus) > 0.8
    with pytest.raises(ValueError, match="extra_splits: 'test_unseen'"):
        judge_training_data(train, valid, root, ["test_unseen"])
    logged: list[float] = []
    train_judge(Judge(CFG.judge), data, replace(CFG.train_judge, steps=2, log_every=1), genus=genus, progress=False,
                hooks=Hooks(on_step=[lambda step, m: logged.append(m["loss"])]))
    assert len(logged) == 2 and all(np.isfinite(logged))
