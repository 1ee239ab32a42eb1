"""KmerTokenizer: golden ids, length/mask invariants (hypothesis), fast path == HF path, save/load."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from g2p.config import preset
from g2p.data.normalise import normalise_barcode
from g2p.models.conditioner import check_fits
from g2p.tokenizer import (
    ENV_ID, MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID, KmerTokenizer, build_tokenizer, max_tokens, num_kmers,
)

# "acgt-ACGGTNCA" normalises to ACGTACGGTNCA (12 nt)
GOLDEN = "acgt-ACGGTNCA"


@lru_cache(maxsize=None)
def tok(k: int, stride: int) -> KmerTokenizer:
    return KmerTokenizer(k=k, stride=stride)


def test_golden_k4_stride4() -> None:
    # ACGT = 0*64+1*16+2*4+3 = 27 -> 32; ACGG = 26 -> 31; TNCA holds N -> UNK
    out = tok(4, 4)(GOLDEN)
    assert out["input_ids"] == [ENV_ID, 32, 31, UNK_ID]
    assert out["attention_mask"] == [1, 1, 1, 1]
    assert tok(4, 4).convert_ids_to_tokens(out["input_ids"]) == ["[ENV]", "ACGT", "ACGG", "[UNK]"]


def test_golden_k3_stride1() -> None:
    # ACG CGT GTA TAC ACG CGG GGT GTN TNC NCA
    out = tok(3, 1)(GOLDEN)
    assert out["input_ids"] == [ENV_ID, 11, 32, 49, 54, 11, 31, 48, UNK_ID, UNK_ID, UNK_ID]
    assert out["attention_mask"] == [1] * 11


def test_vocabulary_layout() -> None:
    t = tok(2, 2)
    assert t.vocab_size == len(t) == NUM_SPECIAL + 16
    assert [t.pad_token_id, t.unk_token_id, t.cls_token_id, t.mask_token_id, t.env_token_id] == list(range(5))
    assert t.convert_tokens_to_ids("[ENV]") == ENV_ID and t.mask_token_id == MASK_ID
    assert t.convert_ids_to_tokens([5, 6, 20]) == ["AA", "AC", "TT"]
    assert KmerTokenizer(k=5).stride == 5  # stride defaults to k: non-overlapping


def test_invalid_settings_are_errors() -> None:
    with pytest.raises(ValueError, match="stride"):
        KmerTokenizer(k=3, stride=4)
    with pytest.raises(ValueError, match="max_nucleotides"):
        KmerTokenizer(k=3, max_nucleotides=700)


def test_barcodebert_mask_mismatch_does_not_happen() -> None:
    # BarcodeBERT sizes the mask max_len // stride (660) but emits (660 - 4) // 1 + 1 = 657 tokens
    out = tok(4, 1)("A" * 660)
    assert len(out["input_ids"]) == len(out["attention_mask"]) == 1 + 657


def test_long_barcode_is_cut_to_max_nucleotides() -> None:
    assert len(tok(3, 3)("ACG" * 300)["input_ids"]) == 1 + 220  # 900 nt -> 660 nt -> 220 k-mers
    short = KmerTokenizer(k=3, stride=3, max_nucleotides=30)
    assert len(short("ACG" * 300)["input_ids"]) == 1 + 10
    assert short.model_max_length == 11


def test_save_load_round_trip(tmp_path) -> None:
    t = KmerTokenizer(k=3, stride=2, max_nucleotides=600)
    t.save_pretrained(tmp_path)
    u = KmerTokenizer.from_pretrained(tmp_path)
    assert (u.k, u.stride, u.max_nucleotides, u.vocab_size) == (3, 2, 600, t.vocab_size)
    batch = ["ACGTTGCAAN" * 7, "TTGA"]
    a = t(batch, padding=True, return_tensors="pt")
    b = u(batch, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])


def test_presets_fit_their_position_tables() -> None:
    for name in ("tiny", "default", "paper"):
        cfg = preset(name)
        check_fits(cfg.conditioner, cfg.tokenizer)
        assert build_tokenizer(cfg.tokenizer).model_max_length <= cfg.conditioner.max_position_embeddings
    paper = preset("paper").tokenizer
    assert (paper.k, paper.stride) == (3, 3) and max_tokens(3, 3) == 221 <= 1024


def test_batch_tensors_and_padding_options() -> None:
    t = tok(4, 4)
    batch = ["ACGTACGTACGT", "ACGT", ""]
    out = t(batch, padding=True, return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (3, 4)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    full = t(batch, padding="max_length", return_tensors="pt")
    assert full["input_ids"].shape == (3, t.model_max_length)
    cut = t(batch, padding=True, truncation=True, max_length=2, return_tensors="pt")
    assert cut["input_ids"].tolist() == [[ENV_ID, 32], [ENV_ID, 32], [ENV_ID, PAD_ID]]


# ---------------------------------------------------------------------------- properties

k_and_stride = st.integers(1, 6).flatmap(lambda k: st.tuples(st.just(k), st.integers(1, k)))
barcode = st.text(alphabet="ACGTNacgtRY-", max_size=800)


@settings(max_examples=60, deadline=None)
@given(ks=k_and_stride, seq=barcode)
def test_ids_and_mask_always_agree(ks: tuple[int, int], seq: str) -> None:
    k, stride = ks
    out = tok(k, stride)(seq)
    n = num_kmers(len(normalise_barcode(seq)[:660]), k, stride)
    assert len(out["input_ids"]) == len(out["attention_mask"]) == 1 + n
    assert all(0 <= i < NUM_SPECIAL + 4**k for i in out["input_ids"])
    assert out["input_ids"][0] == ENV_ID and PAD_ID not in out["input_ids"]


@settings(max_examples=40, deadline=None)
@given(ks=k_and_stride, seqs=st.lists(barcode, min_size=1, max_size=6), extra=st.integers(0, 5))
def test_fast_batch_path_equals_hf_path(ks: tuple[int, int], seqs: list[str], extra: int) -> None:
    k, stride = ks
    t = tok(k, stride)
    fast = t(seqs, padding=True, return_tensors="np")
    slow = t(seqs, padding=True, return_tensors="np", use_fast_batch=False)
    ids, mask = fast["input_ids"], fast["attention_mask"]
    assert np.array_equal(ids, slow["input_ids"]) and np.array_equal(mask, slow["attention_mask"])
    assert ids.shape == mask.shape
    assert ((ids == PAD_ID) == (mask == 0)).all()  # padding is PAD and masked, and nothing else is
    assert ((0 <= ids) & (ids < t.vocab_size)).all()
    # unpadded lists and truncation agree too
    assert t(seqs) == t(seqs, use_fast_batch=False)
    cut = 1 + extra
    a = t(seqs, padding="max_length", truncation=True, max_length=cut, return_tensors="np")
    b = t(seqs, padding="max_length", truncation=True, max_length=cut, return_tensors="np", use_fast_batch=False)
    assert a["input_ids"].shape == (len(seqs), cut)
    assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["attention_mask"], b["attention_mask"])
    # deterministic
    again = t(seqs, padding=True, return_tensors="np")
    assert np.array_equal(again["input_ids"], ids)
