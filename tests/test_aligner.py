"""The aligner g_phi(X_t, t) and its dynamic (noisy-latent) InfoNCE training."""

from __future__ import annotations

import pytest
import torch

from g2p.config import AlignerConfig, ConfigError
from g2p.diffusion.schedule import build_train_scheduler
from g2p.models.aligner import Aligner, aligner_loss
from tests.tiny_diffusion import D, latent_shape, tiny_aligner, tiny_config


def test_embeddings_are_unit_norm_and_timestep_aware():
    cfg = tiny_config()
    al = tiny_aligner(cfg).eval()
    x = torch.randn(3, *latent_shape(cfg))
    with torch.no_grad():
        e = al(x, torch.tensor([5, 5, 5]))
        assert e.shape == (3, D)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(al(x, torch.tensor(5)), e)  # a scalar t broadcasts
        assert not torch.allclose(al(x, torch.tensor([900, 900, 900])), e)
    assert al.logit_scale.item() == pytest.approx(1 / cfg.aligner.temperature_init, rel=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_log_prob_is_a_log_softmax(pooling):
    cfg = tiny_config()
    al = Aligner(AlignerConfig(patch_size=2, width=16, num_layers=1, num_heads=2, pooling=pooling), 4, 8, D)
    x = torch.randn(2, *latent_shape(cfg))
    cands = torch.randn(5, D)
    with torch.no_grad():
        total = sum(al.log_prob(x, torch.tensor([1, 2]), cands, torch.full((2,), k)).exp() for k in range(5))
    torch.testing.assert_close(total, torch.ones(2))


def test_bad_shapes_name_the_field():
    with pytest.raises(ConfigError, match="aligner.patch_size"):
        Aligner(AlignerConfig(patch_size=3), 4, 8, D)
    with pytest.raises(ConfigError, match="aligner.num_heads"):
        Aligner(AlignerConfig(width=30, num_heads=4), 4, 8, D)


def test_condition_is_detached():
    cfg = tiny_config()
    al = tiny_aligner(cfg)
    z0 = torch.randn(4, *latent_shape(cfg))
    c = torch.randn(4, D, requires_grad=True)
    aligner_loss(al, z0, c, build_train_scheduler(cfg.diffusion), torch.Generator().manual_seed(0)).backward()
    assert c.grad is None
    assert al.log_logit_scale.grad is not None  # the temperature learns


def test_aligner_infonce_falls_on_noisy_latents():
    """30 Adam steps on 8 latents paired with 8 conditions: the fixed-seed evaluation loss falls."""
    cfg = tiny_config()
    al = tiny_aligner(cfg)
    sched = build_train_scheduler(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    z0 = 2.0 * torch.randn(8, *latent_shape(cfg), generator=g)
    c = torch.randn(8, D, generator=g)

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(aligner_loss(al, z0, c, sched, torch.Generator().manual_seed(s)) for s in range(4)) / 4)

    before = evaluate()
    opt = torch.optim.Adam(al.parameters(), lr=3e-3)
    for _ in range(30):
        loss = aligner_loss(al, z0, c, sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)
