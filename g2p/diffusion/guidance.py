"""The guidance contract: ``cond_fn(x_t, t, c) -> grad_{x_t} log p(c | x_t)``.

As in openai/guided-diffusion, the caller builds the guidance function and
the sampler alone decides how to apply it (``sampler.condition_score``). Any
differentiable scorer fits the contract -- the aligner of paper 3.4 here, a
judge model or a plugged-in CLIBD elsewhere -- without the sampler knowing it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from g2p.models.aligner import Aligner

__all__ = ["CondFn", "make_aligner_cond_fn", "contrastive_candidates", "sample_negative_bank"]

# x_t (N, C, h, w), t (N,) int64, c (N, d) -> grad (N, C, h, w)
CondFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def contrastive_candidates(c: Tensor, bank: Tensor | None) -> tuple[Tensor, Tensor]:
    """The distinct conditions among ``c`` (N, d) and ``bank`` (M, d), and each row of c's index in them.

    Why distinct: the sampler repeats each condition n times and the bank may
    hold the very condition being generated; a duplicate of the positive
    counted as a negative would cancel its own pull. Returns (K, d), (N,).
    """
    pool = c if bank is None or bank.numel() == 0 else torch.cat([c, bank.to(c)], dim=0)  # (N + M, d)
    cands, inverse = torch.unique(pool, dim=0, return_inverse=True)  # (K, d), (N + M,)
    return cands, inverse[: c.shape[0]]


def make_aligner_cond_fn(aligner: Aligner, negatives_bank: Tensor | None = None) -> CondFn:
    """grad_{x_t} log p_phi(c | x_t), the contrastive log-softmax of the true c against negatives.

    Notation:
        x_t   current latents                                 # (N, C, h, w)
        c     the pooled condition each sample is generated for  # (N, d)
        C_K   distinct conditions of the batch + negatives_bank  # (K, d)

    1. C_K, target = contrastive_candidates(c, negatives_bank)
    2. log p_phi(c | x_t) = log_softmax_k(tau^-1 cos(g_phi(x_t, t), C_k))[target]
    3. grad = d/dx_t sum_i log p_phi(c_i | x_t,i) -- samples are independent in
       the aligner, so the sum's gradient is each sample's own gradient

    Only x_t is a leaf; the aligner's parameter gradients are never computed.
    """

    def cond_fn(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        # 1. candidates (no grad needed)
        cands, target = contrastive_candidates(c.detach(), negatives_bank)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            # 2. log p_phi(c | x_t)
            logp = aligner.log_prob(x, t, cands, target)  # (N,)
            # 3. gradient w.r.t. x_t only
            (grad,) = torch.autograd.grad(logp.sum(), x)
        return grad  # (N, C, h, w)

    return cond_fn


def sample_negative_bank(conditions: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """``size`` rows of training conditions (M, d) drawn without replacement (all rows if fewer)."""
    if size <= 0:
        return conditions[:0]
    if size >= conditions.shape[0]:
        return conditions
    idx = torch.randperm(conditions.shape[0], generator=generator)[:size]
    return conditions[idx.to(conditions.device)]
