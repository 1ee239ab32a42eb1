"""k-mer tokenizer for COI barcodes: a Hugging Face ``PreTrainedTokenizer``.

Why a ``PreTrainedTokenizer`` subclass: ``save_pretrained``/``from_pretrained``,
``tokenizer(batch, padding=True, return_tensors="pt")`` and the collators of
the HF ecosystem then work unchanged, and ``k``/``stride`` travel with the saved
tokenizer (they are init kwargs, written to ``tokenizer_config.json``).

Vocabulary (``5 + 4**k`` ids, fixed by ``k`` alone, so no vocab file is needed)::

    0 [PAD]  1 [UNK]  2 [CLS]  3 [MASK]  4 [ENV]  5.. the 4**k k-mers, ACGT-lexicographic
    (k = 2: 5 AA, 6 AC, 7 AG, 8 AT, 9 CA, ...)

Layout of one encoded barcode (decided here, relied on by the conditioner)::

    [ENV] kmer_1 ... kmer_n [PAD] ... [PAD]     attention_mask 1 ... 1 0 ... 0

* ``[ENV]`` is the slot of the paper's environment token h_e (eq. 2: the place
  token is prepended to the DNA tokens); the conditioner replaces its word
  embedding with the place embedding. No ``[CLS]``: the paper mean-pools, so a
  summary token would be one more token in the mean and nothing else. ``[CLS]``
  stays in the vocabulary for HF compatibility.
* The barcode is first normalised by :func:`g2p.data.normalise.normalise_barcode`
  (the project's one home for barcode rules), then cut to ``max_nucleotides``.
* k-mers start at 0, stride, 2*stride, ...; there are
  ``n = (len - k) // stride + 1`` of them (0 when ``len < k``). Trailing bases
  that do not fill a whole k-mer are dropped.
* A k-mer holding anything but A/C/G/T (N after normalisation) is ``[UNK]``.
* **No padding with N.** BarcodeBERT/CLIBD pad every barcode to 660 nt with N,
  which turns the tail into attended ``[UNK]`` tokens: a short barcode then
  differs from a long one by a run of UNKs that enter attention and the mean.
  Here the tail is ``[PAD]`` with ``attention_mask = 0``, so padding never
  changes the conditioner's output (tested).
* Padding and truncation are on the right only: left padding would shift the
  absolute position embeddings and break that invariance.

The token count and the attention mask come from the same ``n``, so they can
never disagree (BarcodeBERT's tokenizer sizes its mask ``max_len // stride``
but emits ``(max_len - k) // stride + 1`` tokens).

``__call__`` on a list of barcodes takes a vectorised numpy path (bases to
2-bit codes, k-mer ids gathered at the stride, N -> UNK); it is tested equal to
the per-string HF path, which single strings and unusual options still take.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from g2p.config import TokenizerConfig
from g2p.data.normalise import MAX_NUCLEOTIDES, normalise_barcode

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, MASK_TOKEN, ENV_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[MASK]", "[ENV]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, MASK_TOKEN, ENV_TOKEN)
PAD_ID, UNK_ID, CLS_ID, MASK_ID, ENV_ID = range(5)
NUM_SPECIAL = len(SPECIAL_TOKENS)  # k-mer ids start here


def num_kmers(length: int, k: int, stride: int) -> int:
    """Number of k-mers in a barcode of ``length`` nt: starts 0, stride, ...; last one fits whole."""
    return (length - k) // stride + 1 if length >= k else 0


def max_tokens(k: int, stride: int, max_nucleotides: int = MAX_NUCLEOTIDES) -> int:
    """Longest encoded sequence (``[ENV]`` + k-mers of a ``max_nucleotides`` barcode)."""
    return 1 + num_kmers(max_nucleotides, k, stride)


class KmerTokenizer(PreTrainedTokenizer):
    """k-mer tokenizer with configurable ``k`` and ``stride`` (see the module docstring).

    ``stride == k`` gives non-overlapping k-mers (BarcodeBERT, the paper's k = 3),
    ``stride < k`` overlapping ones (DNABERT).
    """

    vocab_files_names: dict[str, str] = {}  # the vocabulary is a function of k
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    truncation_side = "right"

    def __init__(self, k: int = 4, stride: int | None = None, max_nucleotides: int = MAX_NUCLEOTIDES, **kwargs: Any):
        stride = k if stride is None else stride
        if not 1 <= k <= 8:
            raise ValueError(f"k: expected 1..8, got {k}")
        if not 1 <= stride <= k:
            raise ValueError(f"stride: expected 1..k={k}, got {stride} (a stride past k would skip bases)")
        if not 0 <= max_nucleotides <= MAX_NUCLEOTIDES:
            raise ValueError(f"max_nucleotides: expected 0..{MAX_NUCLEOTIDES}, got {max_nucleotides}")
        self.k, self.stride, self.max_nucleotides = k, stride, max_nucleotides
        kmers = ("".join(p) for p in itertools.product("ACGT", repeat=k))
        self._vocab: dict[str, int] = {t: i for i, t in enumerate(itertools.chain(SPECIAL_TOKENS, kmers))}
        self._ids_to_tokens: list[str] = list(self._vocab)
        for name in ("pad_token", "unk_token", "cls_token", "mask_token", "env_token"):
            kwargs.pop(name, None)  # fixed by design; a saved config may repeat them
        kwargs.setdefault("model_max_length", max_tokens(k, stride, max_nucleotides))
        kwargs.setdefault("split_special_tokens", True)  # a barcode never holds "[MASK]" text
        super().__init__(
            k=k, stride=stride, max_nucleotides=max_nucleotides,
            pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, cls_token=CLS_TOKEN, mask_token=MASK_TOKEN,
            env_token=ENV_TOKEN, **kwargs,
        )
        if self.padding_side != "right" or self.truncation_side != "right":
            raise ValueError("KmerTokenizer pads and truncates on the right only (position embeddings)")

    # -- vocabulary ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def env_token_id(self) -> int:
        return ENV_ID

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, UNK_ID)

    def _convert_id_to_token(self, index: int) -> str:
        return self._ids_to_tokens[index] if 0 <= index < len(self._ids_to_tokens) else UNK_TOKEN

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # k (in tokenizer_config.json) rebuilds the vocabulary

    # -- the slow, per-string path (the reference the fast path is tested against)
    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        seq = normalise_barcode(text)[: self.max_nucleotides]
        n = num_kmers(len(seq), self.k, self.stride)
        return [seq[i : i + self.k] for i in range(0, n * self.stride, self.stride)]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        if token_ids_1 is not None:
            raise ValueError("KmerTokenizer encodes one barcode per sequence; pairs are not supported")
        return [ENV_ID] + list(token_ids_0)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return [int(t < NUM_SPECIAL and t != UNK_ID) for t in token_ids_0]
        return [1] + [0] * len(token_ids_0)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    # -- the fast batch path -----------------------------------------------------
    def encode_batch_numpy(
        self, barcodes: Sequence[str], *, max_length: int | None = None, pad_to: int | None = None,
        chunk_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised encoding of many barcodes.

        Returns ``(input_ids, attention_mask)``, both ``(B, L)`` int64, right-padded
        with ``[PAD]``/0. ``max_length`` truncates (the ``[ENV]`` slot counts);
        ``L`` is the longest row, or ``pad_to`` when that is longer.
        Rows are processed ``chunk_size`` at a time so the working set stays in
        cache (several times faster than one pass over a 100k batch).
        """
        k, stride = self.k, self.stride
        # 1. the shared normalisation; token counts per row from the lengths
        seqs = [normalise_barcode(s)[: self.max_nucleotides] for s in barcodes]
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))  # (B,)
        n_tok = np.where(lens >= k, (lens - k) // stride + 1, 0)  # (B,)
        if max_length is not None:
            n_tok = np.minimum(n_tok, max(max_length - 1, 0))
        num_tok = int(n_tok.max()) if len(seqs) else 0  # T
        width = max(1 + num_tok, pad_to or 0)  # L
        cols = np.arange(width)[None, :]  # (1, L)
        if num_tok == 0:
            input_ids = np.full((len(seqs), width), PAD_ID, dtype=np.int64)  # (B, L)
            input_ids[:, 0] = ENV_ID
            return input_ids, (cols == 0).astype(np.int64).repeat(len(seqs), 0)
        # filled chunk by chunk below: np.empty avoids touching 2x B*L*8 bytes twice
        input_ids = np.empty((len(seqs), width), dtype=np.int64)  # (B, L)
        attention_mask = np.empty((len(seqs), width), dtype=np.int64)  # (B, L)
        # 2. per chunk: a (b, W) byte matrix, every row cut or space-padded to W nt
        # (the tail becomes PAD below); k-mer ids from k strided column views.
        # A non-ACGT base codes as 4**k, which pushes the k-mer's base-4 value
        # past 4**k - 1: one comparison then finds every k-mer holding an N.
        nt_width = (num_tok - 1) * stride + k  # W
        span = (num_tok - 1) * stride + 1
        code = np.full(256, 4**k, dtype=np.int32)
        code[list(b"ACGT")] = [0, 1, 2, 3]
        for a in range(0, len(seqs), chunk_size):
            rows = seqs[a : a + chunk_size]
            text = "".join([s[:nt_width].ljust(nt_width) for s in rows]).encode("latin-1", "replace")
            nt = np.frombuffer(text, dtype=np.uint8).reshape(len(rows), nt_width)  # (b, W)
            kmer = code[nt[:, 0:span:stride]]  # (b, T)
            for offset in range(1, k):
                kmer *= 4
                kmer += code[nt[:, offset : offset + span : stride]]
            keep = cols <= n_tok[a : a + len(rows), None]  # (b, L) [ENV] and k-mers
            attention_mask[a : a + len(rows)] = keep
            ids = input_ids[a : a + len(rows)]  # (b, L) view
            ids[:, 0] = ENV_ID
            ids[:, 1 + num_tok :] = PAD_ID
            out = ids[:, 1 : 1 + num_tok]  # (b, T) view
            np.add(kmer, NUM_SPECIAL, out=out, casting="unsafe")
            out[kmer >= 4**k] = UNK_ID
            out[~keep[:, 1 : 1 + num_tok]] = PAD_ID
        return input_ids, attention_mask

    def __call__(self, text: Any = None, *args: Any, use_fast_batch: bool = True, **kwargs: Any) -> BatchEncoding:
        """HF ``__call__``; a list of barcodes with the usual options takes :meth:`encode_batch_numpy`.

        ``use_fast_batch=False`` forces the per-string HF path (for tests and debugging).
        """
        simple_options = not args and set(kwargs) <= _FAST_KWARGS and kwargs.get("add_special_tokens", True)
        if (
            use_fast_batch and simple_options and isinstance(text, (list, tuple))
            and all(isinstance(t, str) for t in text)
            and not kwargs.get("return_token_type_ids") and kwargs.get("return_attention_mask", True) is not False
            and kwargs.get("padding_side") in (None, "right")
        ):
            return self._fast_call(list(text), **kwargs)
        return super().__call__(text, *args, **kwargs)

    def _fast_call(
        self, barcodes: list[str], padding: Any = False, truncation: Any = None, max_length: int | None = None,
        return_tensors: Any = None, verbose: bool = True, **_: Any,
    ) -> BatchEncoding:
        padding_strategy, truncation_strategy, max_length, _ = self._get_padding_truncation_strategies(
            padding=padding, truncation=truncation, max_length=max_length, verbose=verbose
        )
        cut = max_length if truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE else None
        pad_to = max_length if padding_strategy == PaddingStrategy.MAX_LENGTH else None
        ids, mask = self.encode_batch_numpy(barcodes, max_length=cut, pad_to=pad_to)
        if padding_strategy == PaddingStrategy.DO_NOT_PAD:
            lengths = mask.sum(1)
            data: dict[str, Any] = {
                "input_ids": [row[:n].tolist() for row, n in zip(ids, lengths)],
                "attention_mask": [[1] * int(n) for n in lengths],
            }
        else:
            data = {"input_ids": ids, "attention_mask": mask}
            if return_tensors is None:
                data = {key: v.tolist() for key, v in data.items()}
            elif str(getattr(return_tensors, "value", return_tensors)) == "pt":
                import torch  # zero-copy; BatchEncoding would copy with torch.tensor()

                data = {key: torch.from_numpy(v) for key, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)


# options the fast path understands; anything else goes to the HF path
_FAST_KWARGS = frozenset(
    {"padding", "truncation", "max_length", "return_tensors", "return_attention_mask", "return_token_type_ids",
     "add_special_tokens", "padding_side", "verbose"}
)


def build_tokenizer(cfg: TokenizerConfig) -> KmerTokenizer:
    """The tokenizer of a :class:`g2p.config.TokenizerConfig`."""
    return KmerTokenizer(k=cfg.k, stride=cfg.stride, max_nucleotides=cfg.max_nucleotides)


def _register_with_auto_classes() -> None:
    """``AutoTokenizer.from_pretrained(folder)`` finds ``KmerTokenizer`` by its ``tokenizer_class`` name."""
    from transformers import AutoTokenizer, PretrainedConfig

    class KmerTokenizerConfig(PretrainedConfig):
        model_type = "g2p_kmer"

    AutoTokenizer.register(KmerTokenizerConfig, tokenizer_class=KmerTokenizer, exist_ok=True)


_register_with_auto_classes()
