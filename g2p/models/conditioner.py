"""Environment-enhanced DNA conditioner (paper 3.2, eq. 2).

    c = MeanPool(BERT([h_e, h_d,1, ..., h_d,l]))

Notation: B batch, L tokens (``[ENV]`` + k-mers + padding, see
:mod:`g2p.tokenizer`), d = ``hidden_size``, P = ``pool_tokens``.

1. The tokenizer puts an ``[ENV]`` slot first; its word embedding is replaced
   by the environment token h_e (:class:`~g2p.models.geo.EnvironmentEncoder`)
   and the sequence enters a randomly initialised ``transformers.BertModel``
   through ``inputs_embeds``, so BERT adds its position/type embeddings to the
   place token just as to a k-mer.
2. ``pooled`` is the masked mean over every non-pad token, the place token
   included: the c of eq. 2, used by the aligner's InfoNCE and by retrieval.
3. ``context`` is what the UNet cross-attends to. With ``pool_tokens = 0`` it is
   every token state (pad positions zeroed, ``context_mask`` = attention mask).
   With ``pool_tokens = P > 0`` it is ``1 + P`` tokens: the place token's state,
   then the DNA token states averaged (masked) into P consecutive chunks of each
   barcode's own length (chunk of token i = floor(i * P / n)). Fewer keys make
   cross-attention cheaper on a CPU; chunking by each row's own length (not the
   padded length) keeps the result independent of padding, and chunk j stays
   the j-th P-th of the barcode whatever its length. A barcode with fewer than
   P k-mers leaves some chunks empty: zero vectors with mask 0.

Padding never changes ``pooled`` or the non-pad ``context`` (tested): padded keys
are masked in attention, position ids of real tokens do not move (right
padding), and every pooling is masked.

MLM pretraining (:meth:`Conditioner.mlm_loss`) follows BarcodeBERT: a share
``mlm_probability`` (BarcodeBERT: 50%) of the k-mer tokens is chosen, every
chosen token becomes ``[MASK]`` (BarcodeBERT's "all-[MASK]", not BERT's
80/10/10), and cross-entropy is taken on the chosen tokens. Specials, padding,
the place slot and ``[UNK]`` k-mers (those holding N) are never chosen. It
needs no species label, and records without a place use the unknown-place
token, so the whole pretrain split can be used. The MLM head is BERT's
(dense + GELU + LayerNorm + decoder), untied from the input embeddings so that
a plain safetensors ``state_dict`` round trip works (no shared tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from g2p.config import ConditionerConfig, ConfigError, TokenizerConfig
from g2p.models.geo import EnvironmentEncoder
from g2p.tokenizer import ENV_ID, MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID, max_tokens


@dataclass
class ConditionerOutput:
    """What the conditioner hands to the UNet (``context``) and to the aligner (``pooled``)."""

    context: torch.Tensor  # (B, L_ctx, d) per-token context for cross-attention
    context_mask: torch.Tensor  # (B, L_ctx) long, 1 = attend
    pooled: torch.Tensor  # (B, d) c of eq. 2


class MLMHead(nn.Module):
    """BertForMaskedLM's head: dense -> GELU -> LayerNorm -> vocabulary logits."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (..., V)


class Conditioner(nn.Module):
    """BERT over [place token, k-mer tokens] -> per-token context and pooled c."""

    def __init__(self, cfg: ConditionerConfig, vocab_size: int):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(
                f"conditioner.hidden_size: {cfg.hidden_size} is not a multiple of conditioner.num_heads={cfg.num_heads}"
            )
        self.cfg = cfg
        self.vocab_size = vocab_size
        bert_cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            type_vocab_size=1,
            pad_token_id=PAD_ID,
        )
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.env = EnvironmentEncoder(cfg.hidden_size, cfg.env_hidden_size)
        self.mlm_head = MLMHead(cfg.hidden_size, vocab_size, eps=bert_cfg.layer_norm_eps)

    @classmethod
    def from_config(cls, cfg: ConditionerConfig, tokenizer_cfg: TokenizerConfig) -> "Conditioner":
        """Build for a tokenizer config, checking that its longest barcode fits the position table."""
        check_fits(cfg, tokenizer_cfg)
        return cls(cfg, vocab_size=NUM_SPECIAL + 4**tokenizer_cfg.k)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    # -- encoding ----------------------------------------------------------------
    def encode_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lat: torch.Tensor,
        lon: torch.Tensor,
        has_place: torch.Tensor,
    ) -> torch.Tensor:
        """Last BERT hidden states ``(B, L, d)`` with the place token in the ``[ENV]`` slot."""
        B, L = input_ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids: {L} tokens > conditioner.max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        is_env = input_ids == ENV_ID  # (B, L)
        if not bool((is_env.sum(1) == 1).all()):
            raise ValueError(
                "input_ids: every row needs exactly one [ENV] token (tokenize with add_special_tokens=True)"
            )
        words = self.bert.embeddings.word_embeddings(input_ids)  # (B, L, d)
        h_e = self.env(lat, lon, has_place).to(words.dtype)  # (B, d)
        embeds = torch.where(is_env[..., None], h_e[:, None, :], words)  # (B, L, d)
        return self.bert(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state  # (B, L, d)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lat: torch.Tensor,
        lon: torch.Tensor,
        has_place: torch.Tensor,
    ) -> ConditionerOutput:
        """input_ids, attention_mask: (B, L) long; lat, lon: (B,) degrees; has_place: (B,) bool."""
        h = self.encode_tokens(input_ids, attention_mask, lat, lon, has_place)  # (B, L, d)
        mask = attention_mask.to(h.dtype)[..., None]  # (B, L, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, d)
        if self.cfg.pool_tokens > 0:
            context, context_mask = self._chunk_pool(h, input_ids, attention_mask)
        else:
            context, context_mask = h * mask, attention_mask.long()
        return ConditionerOutput(context=context, context_mask=context_mask, pooled=pooled)

    def _chunk_pool(
        self, h: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[place state] + DNA states mean-pooled into P chunks of each row's own length."""
        P = self.cfg.pool_tokens
        is_env = input_ids == ENV_ID  # (B, L)
        dna = attention_mask.bool() & ~is_env  # (B, L)
        n = dna.sum(1, keepdim=True)  # (B, 1) DNA tokens per row
        rank = dna.long().cumsum(1) - 1  # (B, L) index of each DNA token within its row
        chunk = torch.div(rank.clamp(min=0) * P, n.clamp(min=1), rounding_mode="floor")  # (B, L) in 0..P-1
        assign = F.one_hot(chunk, P).to(h.dtype) * dna[..., None].to(h.dtype)  # (B, L, P)
        counts = assign.sum(1)  # (B, P)
        chunks = torch.einsum("blp,bld->bpd", assign, h) / counts.clamp(min=1.0)[..., None]  # (B, P, d)
        env_state = (h * is_env[..., None].to(h.dtype)).sum(1, keepdim=True)  # (B, 1, d)
        context = torch.cat([env_state, chunks], dim=1)  # (B, 1 + P, d)
        ones = torch.ones_like(counts[:, :1], dtype=torch.long)
        context_mask = torch.cat([ones, (counts > 0).long()], dim=1)  # (B, 1 + P)
        return context, context_mask

    # -- MLM pretraining ------------------------------------------------------------
    def mlm_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lat: torch.Tensor,
        lon: torch.Tensor,
        has_place: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """BarcodeBERT-style masked k-mer prediction (see the module docstring); a scalar."""
        maskable = attention_mask.bool() & (input_ids >= NUM_SPECIAL) & (input_ids != UNK_ID)  # (B, L)
        # drawn on the generator's own device (a CPU generator can mask a CUDA batch)
        where = generator.device if generator is not None else input_ids.device
        draw = torch.rand(input_ids.shape, generator=generator, device=where).to(input_ids.device)  # (B, L)
        chosen = maskable & (draw < self.cfg.mlm_probability)  # (B, L)
        masked_ids = torch.where(chosen, torch.full_like(input_ids, MASK_ID), input_ids)  # (B, L)
        h = self.encode_tokens(masked_ids, attention_mask, lat, lon, has_place)  # (B, L, d)
        if not bool(chosen.any()):
            return h.sum() * 0.0  # nothing to predict: a zero that keeps the graph
        logits = self.mlm_head(h[chosen])  # (M, V)
        return F.cross_entropy(logits.float(), input_ids[chosen])


def check_fits(cfg: ConditionerConfig, tokenizer_cfg: TokenizerConfig) -> None:
    """Raise :class:`ConfigError` if the longest tokenized barcode exceeds the position table."""
    need = max_tokens(tokenizer_cfg.k, tokenizer_cfg.stride, tokenizer_cfg.max_nucleotides)
    if need > cfg.max_position_embeddings:
        raise ConfigError(
            f"conditioner.max_position_embeddings: {cfg.max_position_embeddings} < {need} tokens of a "
            f"{tokenizer_cfg.max_nucleotides} nt barcode at tokenizer.k={tokenizer_cfg.k}, "
            f"tokenizer.stride={tokenizer_cfg.stride} ([ENV] + k-mers)"
        )
