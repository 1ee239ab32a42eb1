"""Conditioner: shapes, padding invariance, unknown place, MLM learning, safetensors round trip, paper size."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from g2p.config import ConditionerConfig, ConfigError, TokenizerConfig, preset
from g2p.models.conditioner import Conditioner, ConditionerOutput, check_fits
from g2p.tokenizer import KmerTokenizer, build_tokenizer

TINY = preset("tiny")


def tiny_model(pool_tokens: int = 0, seed: int = 0) -> Conditioner:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY.conditioner, pool_tokens=pool_tokens)
    return Conditioner.from_config(cfg, TINY.tokenizer).eval()


@lru_cache(maxsize=None)
def cached_model(pool_tokens: int) -> Conditioner:
    return tiny_model(pool_tokens)


@lru_cache(maxsize=None)
def tokenizer() -> KmerTokenizer:
    return build_tokenizer(TINY.tokenizer)


def random_barcodes(n: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (n, length), generator=g)
    return ["".join("ACGT"[c] for c in row) for row in codes.tolist()]


def encode(barcodes: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer()(barcodes, **{"padding": True, "return_tensors": "pt", **kw})
    return out["input_ids"], out["attention_mask"]


PLACE = (torch.tensor([45.0, -12.0, float("nan")]), torch.tensor([7.5, 130.0, float("nan")]),
         torch.tensor([True, True, False]))


@pytest.mark.parametrize("pool_tokens", [0, 4])
def test_output_shapes(pool_tokens: int) -> None:
    m = cached_model(pool_tokens)
    ids, mask = encode(random_barcodes(2, 40) + ["ACGTACGT"])  # 10, 10 and 2 k-mers: L = 11
    out = m(ids, mask, *PLACE)
    assert isinstance(out, ConditionerOutput)
    d = m.hidden_size
    L_ctx = ids.shape[1] if pool_tokens == 0 else 1 + pool_tokens
    assert out.context.shape == (3, L_ctx, d) and out.pooled.shape == (3, d)
    assert out.context_mask.shape == (3, L_ctx) and out.context_mask.dtype == torch.long
    if pool_tokens == 0:
        assert torch.equal(out.context_mask, mask)
        assert (out.context[mask == 0] == 0).all()  # pad positions zeroed
    else:
        assert out.context_mask[:2].all()  # 10 k-mers fill 4 chunks
        # 2 k-mers land in chunks floor(0 * 4 / 2) = 0 and floor(1 * 4 / 2) = 2: chunk j stays
        # the j-th quarter of the barcode; the others are empty, zero and masked
        assert out.context_mask[2].tolist() == [1, 1, 0, 1, 0]
        assert (out.context[2, [2, 4]] == 0).all()


def test_pooled_is_masked_mean_including_place_token() -> None:
    m = cached_model(0)
    ids, mask = encode(random_barcodes(2, 33))
    with torch.no_grad():
        h = m.encode_tokens(ids, mask, *(p[:2] for p in PLACE))
        out = m(ids, mask, *(p[:2] for p in PLACE))
    assert torch.allclose(out.pooled, h.mean(1), atol=1e-6)  # no padding here: plain mean over all tokens


@settings(max_examples=15, deadline=None)
@given(
    length=st.integers(0, 120), extra=st.integers(1, 30), pool_tokens=st.sampled_from([0, 3]),
    known=st.booleans(),
)
def test_padding_never_changes_the_output(length: int, extra: int, pool_tokens: int, known: bool) -> None:
    m = cached_model(pool_tokens)
    seq = random_barcodes(1, length, seed=length)[0]
    ids, mask = encode([seq])
    n = ids.shape[1]
    ids_p, mask_p = encode([seq], padding="max_length", max_length=n + extra)
    place = (torch.tensor([33.0]), torch.tensor([-71.0]), torch.tensor([known]))
    with torch.no_grad():
        a, b = m(ids, mask, *place), m(ids_p, mask_p, *place)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
    if pool_tokens == 0:
        assert torch.allclose(a.context, b.context[:, :n], atol=1e-5)
        assert (b.context[:, n:] == 0).all() and (b.context_mask[:, n:] == 0).all()
    else:
        assert torch.allclose(a.context, b.context, atol=1e-5)
        assert torch.equal(a.context_mask, b.context_mask)


def test_unknown_place_token_is_used() -> None:
    m = cached_model(0)
    ids, mask = encode(random_barcodes(1, 60) * 3)
    lat = torch.tensor([10.0, -50.0, float("nan")])
    lon = torch.tensor([20.0, 100.0, float("nan")])
    with torch.no_grad():
        unknown = m(ids, mask, lat, lon, torch.tensor([False, False, False])).pooled
        known = m(ids, mask, lat, lon, torch.tensor([True, True, True])).pooled
        env = m.env(lat, lon, torch.tensor([False, True, True]))
    assert torch.allclose(unknown[0], unknown[1]) and torch.allclose(unknown[0], unknown[2])  # place ignored
    assert torch.allclose(known[2], unknown[2])  # NaN coordinates: unknown even with the flag set
    assert not torch.allclose(known[0], known[1], atol=1e-4)  # a real place moves c
    assert not torch.allclose(known[0], unknown[0], atol=1e-4)
    assert torch.equal(env[0], m.env.unknown_place.detach())


def test_mlm_training_lowers_the_loss() -> None:
    m = tiny_model().train()
    ids, mask = encode(random_barcodes(16, 120, seed=1))  # 30 k-mers each
    lat, lon = torch.full((16,), float("nan")), torch.full((16,), float("nan"))
    no_place = torch.zeros(16, dtype=torch.bool)  # the pretrain split: no labels, no coordinates

    def eval_loss() -> float:
        with torch.no_grad():
            return m.mlm_loss(ids, mask, lat, lon, no_place, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss = m.mlm_loss(ids, mask, lat, lon, no_place, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.5, (before, after)


def test_mlm_masks_only_kmers() -> None:
    m = cached_model(0)
    # a barcode made only of N: every k-mer is UNK, nothing can be masked -> a zero loss with a graph
    ids, mask = encode(["N" * 40])
    loss = m.mlm_loss(ids, mask, *(p[:1] for p in PLACE), generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and loss.requires_grad


def test_safetensors_round_trip(tmp_path) -> None:
    a = tiny_model(pool_tokens=3, seed=0)
    save_file(a.state_dict(), tmp_path / "conditioner.safetensors")
    b = tiny_model(pool_tokens=3, seed=1)  # different init, then overwritten
    b.load_state_dict(load_file(tmp_path / "conditioner.safetensors"))
    ids, mask = encode(random_barcodes(2, 77))
    with torch.no_grad():
        oa, ob = a(ids, mask, *(p[:2] for p in PLACE)), b(ids, mask, *(p[:2] for p in PLACE))
    assert torch.equal(oa.pooled, ob.pooled) and torch.equal(oa.context, ob.context)


def test_determinism_under_manual_seed() -> None:
    ids, mask = encode(random_barcodes(2, 50))
    a, b = tiny_model(seed=7), tiny_model(seed=7)
    with torch.no_grad():
        assert torch.equal(a(ids, mask, *(p[:2] for p in PLACE)).pooled, b(ids, mask, *(p[:2] for p in PLACE)).pooled)
    la = a.mlm_loss(ids, mask, *(p[:2] for p in PLACE), generator=torch.Generator().manual_seed(3))
    lb = b.mlm_loss(ids, mask, *(p[:2] for p in PLACE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(la, lb)


def test_bad_inputs_and_configs_are_errors() -> None:
    m = cached_model(0)
    ids, mask = encode(["ACGTACGT"])
    with pytest.raises(ValueError, match="ENV"):
        m(ids[:, 1:], mask[:, 1:], *(p[:1] for p in PLACE))
    too_long = torch.full((1, TINY.conditioner.max_position_embeddings + 1), 5)
    too_long[:, 0] = 4
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(too_long, torch.ones_like(too_long), *(p[:1] for p in PLACE))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        check_fits(ConditionerConfig(max_position_embeddings=256), TokenizerConfig(k=1, stride=1))
    with pytest.raises(ConfigError, match="num_heads"):
        Conditioner(ConditionerConfig(hidden_size=30, num_heads=4), vocab_size=21)


def test_paper_size_builds_and_runs() -> None:
    """The paper's BERT (12 x 12 heads, 768 wide, 1024 positions) builds and encodes a barcode. How fast is
    a benchmark's question (python -m benchmarks conditioner), not this test's: a loaded box is slow."""
    paper = preset("paper")
    torch.manual_seed(0)
    m = Conditioner.from_config(paper.conditioner, paper.tokenizer).eval()
    tok = build_tokenizer(paper.tokenizer)
    out = tok(random_barcodes(1, 658), padding=True, return_tensors="pt")
    assert out["input_ids"].shape == (1, 1 + 219)  # 658 nt, k = stride = 3
    with torch.no_grad():
        o = m(out["input_ids"], out["attention_mask"], torch.tensor([51.5]), torch.tensor([-0.1]),
              torch.tensor([True]))
    assert o.pooled.shape == (1, 768) and o.context.shape == (1, 220, 768)
    assert m.bert.config.num_hidden_layers == 12 and m.bert.config.num_attention_heads == 12
    assert m.bert.config.max_position_embeddings == 1024
