"""Schedule (eq. 5), timestep sampling, the denoising loss (eq. 6), InfoNCE (eq. 9) and the VAE."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from g2p.config import ConfigError, DiffusionConfig, SamplingConfig
from g2p.diffusion.losses import diffusion_loss, info_nce
from g2p.diffusion.schedule import add_noise, build_sampling_scheduler, build_train_scheduler, sample_timesteps
from g2p.models.vae import (
    decode,
    encode,
    estimate_scaling_factor,
    foreground_weights,
    set_scaling_factor,
    vae_loss,
)
from tests.tiny_diffusion import latent_shape, random_context, tiny_config, tiny_denoiser, tiny_vae

# ---------------------------------------------------------------- schedule


def test_add_noise_is_eq5():
    cfg = DiffusionConfig()
    sched = build_train_scheduler(cfg)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    gamma = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(add_noise(sched, z0, eps, t), gamma.sqrt() * z0 + (1 - gamma).sqrt() * eps)


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpmsolver++", "unipc", "euler"])
def test_sampling_scheduler_shares_the_training_betas(kind):
    cfg = DiffusionConfig(beta_schedule="scaled_linear")
    train = build_train_scheduler(cfg)
    samp = build_sampling_scheduler(cfg, SamplingConfig(scheduler=kind))
    assert torch.equal(train.alphas_cumprod, samp.alphas_cumprod)
    assert samp.config.prediction_type == "epsilon"


def test_unknown_beta_schedule_names_the_field():
    with pytest.raises(ConfigError, match="diffusion.beta_schedule"):
        build_train_scheduler(DiffusionConfig(beta_schedule="nonsense"))


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["uniform", "logit_normal"]), mean=st.floats(-3, 3), seed=st.integers(0, 2**31))
def test_timesteps_in_range_and_seeded(kind, mean, seed):
    cfg = DiffusionConfig(num_train_timesteps=1000, timestep_sampling=kind, timestep_logit_mean=mean)
    a = sample_timesteps(cfg, 64, torch.Generator().manual_seed(seed))
    b = sample_timesteps(cfg, 64, torch.Generator().manual_seed(seed))
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) <= 999


def test_logit_normal_favours_high_noise_with_positive_mean():
    g = torch.Generator().manual_seed(0)
    cfg = DiffusionConfig(timestep_sampling="logit_normal", timestep_logit_mean=1.0)
    t = sample_timesteps(cfg, 4000, g).float()
    assert t.median() > 650  # sigmoid(1) * 1000 = 731
    uni = sample_timesteps(DiffusionConfig(), 4000, g).float()
    assert abs(uni.mean() - 500) < 30


# ---------------------------------------------------------------- eq. 6


def test_condition_dropout_one_means_null_context_everywhere():
    cfg = tiny_config()
    den = tiny_denoiser(cfg)
    sched = build_train_scheduler(cfg.diffusion)
    z0 = torch.randn(4, *latent_shape(cfg))
    ctx, mask, _ = random_context(4)
    all_null = DiffusionConfig(condition_dropout=1.0)
    none = DiffusionConfig(condition_dropout=0.0)
    null_ctx, null_mask = den.null_condition(4, ctx.shape[1])
    a = diffusion_loss(den, z0, ctx, mask, sched, all_null, torch.Generator().manual_seed(5))
    # same eps and t: the dropout draw comes after them in the generator stream
    b = diffusion_loss(den, z0, null_ctx.detach(), null_mask, sched, none, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    loss = diffusion_loss(den, z0, ctx, mask, sched, none, torch.Generator().manual_seed(5))
    loss.backward()
    assert den.null_context.grad is None or den.null_context.grad.abs().sum() == 0


def test_tiny_training_run_lowers_diffusion_loss():
    """40 Adam steps on 8 fixed latents: the held-fixed evaluation loss must fall clearly."""
    cfg = tiny_config()
    den = tiny_denoiser(cfg)
    sched = build_train_scheduler(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(8, *latent_shape(cfg), generator=g) * 0.5 + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    ctx, mask, _ = random_context(8)
    dcfg = DiffusionConfig(condition_dropout=0.1)

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(diffusion_loss(den, z0, ctx, mask, sched, dcfg, torch.Generator().manual_seed(s))
                             for s in range(4)) / 4)

    before = evaluate()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    for _ in range(40):
        loss = diffusion_loss(den, z0, ctx, mask, sched, dcfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------- eq. 9


def test_info_nce_low_when_aligned_high_when_shuffled():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(8, 16, generator=g)
    scale = torch.tensor(1 / 0.07)
    aligned = info_nce(c + 0.01 * torch.randn(8, 16, generator=g), c, scale)
    shuffled = info_nce(c.roll(1, 0), c, scale)
    assert aligned < 0.05 < 2.0 < shuffled
    assert info_nce(c, c, scale, symmetric=True) < 0.05


def test_info_nce_masks_duplicate_conditions():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 16, generator=g)
    c[1] = c[0]  # the same barcode and place twice in a batch
    e = c.clone()
    loss = info_nce(e, c, torch.tensor(20.0))
    assert torch.isfinite(loss) and loss < 1e-3  # the twin is not a false negative


# ---------------------------------------------------------------- VAE


def _insect_images(b: int = 4, size: int = 16) -> torch.Tensor:
    x = torch.ones(b, 3, size, size)  # light background
    for i in range(b):
        x[i, :, 5 + i % 3:11, 4:12] = torch.tensor([-0.6, 0.2 - 0.2 * i, 0.4]).view(3, 1, 1)
    return x


def test_foreground_weights_mark_the_specimen():
    x = _insect_images()
    w = foreground_weights(x, foreground_weight=10.0, threshold=0.1)
    assert w.shape == (4, 1, 16, 16)
    assert w[0, 0, 7, 7] == 10.0 and w[0, 0, 0, 0] == 1.0
    grey = x - 0.3  # a tinted background is still background
    assert foreground_weights(grey, foreground_weight=10.0, threshold=0.1)[0, 0, 0, 0] == 1.0


def test_vae_round_trip_shapes_and_scaling(tmp_path):
    cfg = tiny_config()
    vae = tiny_vae(cfg)
    x = _insect_images()
    z = encode(vae, x)
    assert z.shape == (4, *latent_shape(cfg))
    assert torch.equal(z, encode(vae, x))  # posterior mean: deterministic
    y = decode(vae, z)
    assert y.shape == x.shape and y.abs().max() <= 1.0
    s = estimate_scaling_factor(vae, x)
    set_scaling_factor(vae, s)
    assert encode(vae, x).std().item() == pytest.approx(1.0, rel=1e-3)
    vae.save_pretrained(tmp_path)
    assert vae.__class__.from_pretrained(tmp_path).config.scaling_factor == pytest.approx(s)


def test_vae_loss_falls():
    cfg = tiny_config()
    vae = tiny_vae(cfg)
    x = _insect_images()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = vae_loss(vae, x, cfg.vae, generator=g)
    assert set(first) == {"loss", "rec", "kl", "mse"}
    for _ in range(15):
        out = vae_loss(vae, x, cfg.vae, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["rec"] < 0.6 * first["rec"]


def test_min_snr_weights_cap_the_easy_low_noise_steps():
    from g2p.diffusion.losses import min_snr_weights

    sched = build_train_scheduler(DiffusionConfig())
    t = torch.tensor([0, 50, 200, 500, 900, 999])
    w = min_snr_weights(sched, t, 5.0)
    ab = sched.alphas_cumprod.double()[t]
    snr = ab / (1 - ab)
    torch.testing.assert_close(w, (torch.clamp(snr, max=5.0) / snr).float())
    assert w[0] < 0.01 and w[-1] == 1.0 and bool((w[1:] >= w[:-1]).all())  # more noise, no less weight
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(sched, t, 0.0)


def test_min_snr_loss_is_the_weighted_mean_of_the_per_example_losses():
    cfg = tiny_config()
    den = tiny_denoiser(cfg)
    sched = build_train_scheduler(cfg.diffusion)
    z0 = torch.randn(6, *latent_shape(cfg))
    ctx, mask, _ = random_context(6)
    plain = DiffusionConfig(condition_dropout=0.0)
    huge = DiffusionConfig(condition_dropout=0.0, loss_weighting="min_snr", min_snr_gamma=1e12)
    small = DiffusionConfig(condition_dropout=0.0, loss_weighting="min_snr", min_snr_gamma=1.0)
    a = diffusion_loss(den, z0, ctx, mask, sched, plain, torch.Generator().manual_seed(3))
    b = diffusion_loss(den, z0, ctx, mask, sched, huge, torch.Generator().manual_seed(3))
    c = diffusion_loss(den, z0, ctx, mask, sched, small, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)  # a gamma above every SNR weighs every example 1: the plain loss
    assert c < a  # weights <= 1, and below 1 at the low-noise steps drawn
    c.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in den.parameters())
    with pytest.raises(ConfigError, match="loss_weighting"):
        tiny_config().override({"diffusion": {"loss_weighting": "snr"}})
