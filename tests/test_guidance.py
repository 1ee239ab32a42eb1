"""Aligner guidance (eq. 8): the cond_fn contract, its bank-only contrast, and how it is applied."""

from __future__ import annotations

import torch

from g2p.diffusion.guidance import condition_score, make_aligner_cond_fn, sample_negative_bank
from tests.tiny_diffusion import D, latent_shape, tiny_aligner, tiny_config, tiny_denoiser

CFG = tiny_config()
ALIGNER = tiny_aligner(CFG).eval()


def _log_p(x, t, c, bank):
    """log softmax of the true c against the bank (no bank row equal to c), per sample."""
    e = ALIGNER(x, t)
    s = ALIGNER.logit_scale
    pos = s * (e * torch.nn.functional.normalize(c, dim=-1)).sum(-1, keepdim=True)
    neg = s * e @ torch.nn.functional.normalize(bank, dim=-1).T
    return pos[:, 0] - torch.logsumexp(torch.cat([pos, neg], 1), 1)


def test_cond_fn_gradient_ascends_log_p_and_touches_no_parameter():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, *latent_shape(CFG), generator=g)
    t = torch.full((4,), 400)
    c, bank = torch.randn(4, D, generator=g), torch.randn(5, D, generator=g)
    grad = make_aligner_cond_fn(ALIGNER, bank)(x, t, c)
    assert grad.shape == x.shape and not x.requires_grad
    with torch.no_grad():
        before = _log_p(x, t, c, bank)
        after = _log_p(x + 1e-2 * grad / grad.norm(), t, c, bank)
    assert (after > before).all()
    assert all(p.grad is None for p in ALIGNER.parameters())  # only x_t was differentiated


def test_each_sample_is_contrasted_with_the_bank_alone_never_its_neighbours():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *latent_shape(CFG), generator=g)
    t = torch.tensor([100, 500, 900])
    c, bank = torch.randn(3, D, generator=g), torch.randn(4, D, generator=g)
    fn = make_aligner_cond_fn(ALIGNER, bank)
    together = fn(x, t, c)
    for i in range(3):
        alone = fn(x[i:i + 1], t[i:i + 1], c[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-7)
    # the gradient is that of log p against the bank (autograd of the explicit formula)
    xx = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_log_p(xx, t, c, bank).sum(), xx)
    torch.testing.assert_close(together, want, rtol=1e-4, atol=1e-6)


def test_a_bank_copy_of_the_condition_is_not_its_own_negative():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, *latent_shape(CFG), generator=g)
    t = torch.full((2,), 300)
    c, bank = torch.randn(2, D, generator=g), torch.randn(3, D, generator=g)
    with_copy = make_aligner_cond_fn(ALIGNER, torch.cat([bank, c[:1]]))(x, t, c)
    without = make_aligner_cond_fn(ALIGNER, bank)(x, t, c)
    torch.testing.assert_close(with_copy[:1], without[:1], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(with_copy[1:], without[1:])  # for sample 1, c[0] is a real negative


def test_condition_score_is_eq8():
    eps, grad = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    got = condition_score(eps, grad, torch.tensor(0.36), 2.0)
    torch.testing.assert_close(got, eps - 0.8 * 2.0 * grad)


def test_negative_bank_draws_without_replacement():
    bank = torch.randn(3, D)
    got = sample_negative_bank(bank, 2, torch.Generator().manual_seed(0))
    assert got.shape == (2, D) and len(torch.unique(got, dim=0)) == 2
    assert sample_negative_bank(bank, 10).shape == (3, D) and sample_negative_bank(bank, 0).shape == (0, D)


def test_conditioner_to_loss_reaches_the_conditioner():
    """Barcode + place -> Conditioner -> eq. 6: the gradient reaches the conditioner's embeddings."""
    from g2p.diffusion.losses import diffusion_loss
    from g2p.diffusion.schedule import build_train_scheduler
    from g2p.models.conditioner import Conditioner
    from g2p.tokenizer import build_tokenizer

    ccfg = CFG.conditioner.__class__(hidden_size=D, num_layers=1, num_heads=2, intermediate_size=32,
                                     max_position_embeddings=64, env_hidden_size=8, pool_tokens=4)
    torch.manual_seed(0)
    cond = Conditioner.from_config(ccfg, CFG.tokenizer.__class__(k=4, stride=4, max_nucleotides=200))
    tok = build_tokenizer(CFG.tokenizer.__class__(k=4, stride=4, max_nucleotides=200))
    g = torch.Generator().manual_seed(0)
    barcodes = ["".join("ACGT"[i] for i in torch.randint(0, 4, (n,), generator=g)) for n in (120, 90)]
    enc = tok(barcodes, padding=True, return_tensors="pt")
    out = cond(enc["input_ids"], enc["attention_mask"], torch.tensor([10.0, -40.0]), torch.tensor([5.0, 120.0]),
               torch.tensor([True, False]))
    z0 = torch.randn(2, *latent_shape(CFG), generator=g)
    loss = diffusion_loss(tiny_denoiser(CFG), z0, out.context, out.context_mask,
                          build_train_scheduler(CFG.diffusion), CFG.diffusion, g)
    loss.backward()
    assert cond.bert.embeddings.word_embeddings.weight.grad is not None
