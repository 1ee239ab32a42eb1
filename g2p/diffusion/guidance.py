"""The guidance contract: ``cond_fn(x_t, t, c) -> grad_{x_t} log p(c | x_t)``, and how it is applied.

As in openai/guided-diffusion, the caller builds the guidance function and
the sampling loop applies it once, to the noise prediction
(:func:`condition_score`), which makes it valid for every epsilon-predicting
scheduler without branching on its class. Any differentiable scorer fits the
contract -- the aligner of paper 3.4 here, a judge model or a plugged-in CLIBD
elsewhere -- without the sampler knowing it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from g2p.models.aligner import Aligner

__all__ = ["CondFn", "condition_score", "make_aligner_cond_fn", "sample_negative_bank"]

# x_t (N, C, h, w), t (N,), c (N, d) -> grad (N, C, h, w)
CondFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def condition_score(eps: Tensor, grad: Tensor, alpha_bar_t: Tensor | float, scale: float) -> Tensor:
    """Eq. 8 on the noise prediction: eps' = eps - sqrt(1 - gamma_t) * w * grad log p(c | x_t).

    Since eps = -sqrt(1 - gamma_t) * score, this adds w * grad log p(c | x_t)
    to the score (guided-diffusion's ``condition_score``).
    """
    return eps - (1.0 - torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)).sqrt() * scale * grad


def make_aligner_cond_fn(aligner: Aligner, negatives_bank: Tensor | None = None) -> CondFn:
    """grad_{x_t} log p_phi(c | x_t): each sample's own c against the negative bank, never its neighbours.

    Notation:
        x_t   current latents                                     # (N, C, h, w)
        c     the pooled condition each sample is generated for  # (N, d)
        M     the negative bank (training conditions)             # (M, d)
        e     g_phi(x_t, t), unit norm                            # (N, d)

    1. logits: l_pos = tau^-1 cos(e_i, c_i); l_neg = tau^-1 cos(e_i, M_m), with
       a bank row equal to c_i left out (a copy of the positive counted as a
       negative would cancel its own pull)
    2. log p_phi(c_i | x_t,i) = l_pos - logsumexp(l_pos, l_neg)
    3. grad = d/dx_t sum_i log p_phi(c_i | x_t,i): samples are independent in
       the aligner, so the sum's gradient is each sample's own gradient

    Row i depends on nothing but (x_t,i, t_i, c_i) and the bank, so an image
    is the same alone or in any batch. Only x_t is a leaf; the aligner's
    parameter gradients are never computed.
    """

    def cond_fn(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        c = torch.nn.functional.normalize(c.detach(), dim=-1)
        bank = c.new_zeros(0, c.shape[-1]) if negatives_bank is None else negatives_bank.to(c)
        bank = torch.nn.functional.normalize(bank, dim=-1)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            e = aligner(x, t)  # (N, d)
            scale = aligner.logit_scale
            # 1. logits of the positive and of the bank
            pos = scale * (e * c).sum(-1, keepdim=True)  # (N, 1)
            neg = scale * e @ bank.T  # (N, M)
            same = (bank[None, :, :] == c[:, None, :]).all(-1)  # (N, M)
            neg = neg.masked_fill(same, float("-inf"))
            # 2. contrastive log-probability of each sample's own condition
            logp = pos[:, 0] - torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)  # (N,)
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
