"""UNet construction, pretrained-folder loading, LoRA training surface and adapter export."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from g2p.config import ConfigError
from g2p.diffusion.losses import diffusion_loss
from g2p.diffusion.schedule import build_train_scheduler
from g2p.models.unet import (
    Denoiser,
    add_lora,
    add_pooled_embedding,
    build_unet,
    freeze_base,
    get_lora_state_dict,
    load_lora_adapter,
    save_lora_adapter,
    set_lora_state_dict,
    trainable_parameters,
)
from g2p.models.vae import build_vae
from tests.tiny_diffusion import D, latent_shape, random_context, tiny_config, tiny_denoiser, tiny_vae


def _inputs(cfg, b=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, *latent_shape(cfg), generator=g)
    ctx, mask, _ = random_context(b)
    return x, torch.tensor([10, 700][:b]), ctx, mask


def _randomise_lora(unet, seed=1):
    """peft starts B at 0 (adapter = identity); give it values so round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_build_follows_config():
    cfg = tiny_config()
    unet = tiny_denoiser(cfg).unet
    c = unet.config
    assert c.sample_size == 8 and c.in_channels == c.out_channels == 4
    assert c.cross_attention_dim == D
    assert tuple(c.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(c.up_block_types) == ("CrossAttnUpBlock2D", "UpBlock2D")


def test_bad_levels_name_the_field():
    cfg = tiny_config().set("unet.cross_attention_levels", [True])
    with pytest.raises(ConfigError, match="unet.cross_attention_levels"):
        build_unet(cfg.unet, cfg.vae, D)


def test_null_condition_ignores_padding_and_mask_none_equals_all_ones():
    cfg = tiny_config()
    den = tiny_denoiser(cfg).eval()
    x, t, ctx, _ = _inputs(cfg)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        a = den(x, t, *den.drop_condition(ctx, None, drop))
        b = den(x, t, *den.drop_condition(torch.randn(2, 9, D), None, drop))
        assert torch.equal(a[0], b[0])  # null example: context length and content irrelevant
        full = torch.ones(2, ctx.shape[1], dtype=torch.bool)
        assert torch.allclose(den(x, t, ctx, None), den(x, t, ctx, full), atol=1e-6)


def test_lora_only_adapter_and_null_context_train():
    cfg = tiny_config()
    den = tiny_denoiser(cfg)
    add_lora(den.unet, cfg.lora)
    names = [n for n, _ in trainable_parameters(den)]
    pooled = [n for n in names if n.startswith("unet.class_embedding.")]
    assert len(pooled) == 4  # the pooled-condition MLP (lora.pooled_embedding), trained in full
    assert "null_context" in names
    assert all("lora_" in n for n in names if n != "null_context" and n not in pooled)
    assert len(names) > 5
    for p in den.parameters():  # freeze_base reaches the same split from a fully trainable model
        p.requires_grad_(True)
    freeze_base(den)
    assert [n for n, _ in trainable_parameters(den)] == names
    x, _, ctx, mask = _inputs(cfg)
    loss = diffusion_loss(den, x, ctx, mask, build_train_scheduler(cfg.diffusion),
                          cfg.diffusion.__class__(condition_dropout=0.5), torch.Generator().manual_seed(0))
    loss.backward()
    for n, p in den.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in den.named_parameters() if "lora_B" in n)


def test_lora_state_dict_round_trip():
    cfg = tiny_config()
    den = tiny_denoiser(cfg)
    add_lora(den.unet, cfg.lora)
    _randomise_lora(den.unet)
    state = get_lora_state_dict(den.unet)
    assert state and all("lora_" in k for k in state)
    other = tiny_denoiser(cfg)
    add_lora(other.unet, cfg.lora)
    set_lora_state_dict(other.unet, state)
    for k, v in get_lora_state_dict(other.unet).items():
        assert torch.equal(v, state[k]), k


def test_adapter_export_loads_with_diffusers_loader(tmp_path):
    cfg = tiny_config()  # rank 2, alpha 4: alpha must come back from the metadata
    den = tiny_denoiser(cfg, seed=0).eval()
    add_lora(den.unet, cfg.lora)
    _randomise_lora(den.unet)
    x, t, ctx, mask = _inputs(cfg)
    with torch.no_grad():
        want = den(x, t, ctx, mask)
    path = save_lora_adapter(den.unet, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    # diffusers' own reader sees a well-formed SD LoRA: unet.-prefixed, diffusers key names
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora"), local_files_only=True)
    assert state and all(k.startswith("unet.") and "lora" in k for k in state)

    fresh = tiny_denoiser(cfg, seed=0).eval()  # same base weights, no adapter
    fresh.null_context.data.copy_(den.null_context.data)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, t, ctx, mask), want)
    load_lora_adapter(fresh.unet, tmp_path / "lora")
    with torch.no_grad():
        got = fresh(x, t, ctx, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _save_tiny_sd(tmp_path, cfg):
    tiny_vae(cfg).save_pretrained(tmp_path / "vae")
    tiny_denoiser(cfg).unet.save_pretrained(tmp_path / "unet")


def test_pretrained_folder_loads_and_matches(tmp_path):
    cfg = tiny_config()
    _save_tiny_sd(tmp_path, cfg)
    pcfg = cfg.override({"vae": {"pretrained_path": str(tmp_path)}, "unet": {"pretrained_path": str(tmp_path)}})
    unet = build_unet(pcfg.unet, pcfg.vae, D).eval()
    ref = tiny_denoiser(cfg).unet.eval()
    x, t, ctx, _ = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, ref(x, t, ctx).sample)
    vae = build_vae(pcfg.vae)
    assert vae.config.latent_channels == 4


def test_pretrained_mismatches_name_the_field(tmp_path):
    cfg = tiny_config()
    _save_tiny_sd(tmp_path, cfg)
    pcfg = cfg.override({"vae": {"pretrained_path": str(tmp_path)}, "unet": {"pretrained_path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="conditioner.hidden_size"):
        build_unet(pcfg.unet, pcfg.vae, D + 8)
    wrong_latents = pcfg.set("vae.latent_channels", 8)
    with pytest.raises(ConfigError, match="vae.latent_channels"):
        build_unet(wrong_latents.unet, wrong_latents.vae, D)
    with pytest.raises(ConfigError, match="vae.latent_channels"):
        build_vae(wrong_latents.vae)
    with pytest.raises(ConfigError, match="vae.scaling_factor"):
        build_vae(pcfg.set("vae.scaling_factor", 0.5).vae)
    missing = cfg.set("unet.pretrained_path", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="unet.pretrained_path"):
        build_unet(missing.unet, missing.vae, D)


def test_denoiser_wraps_any_unet():
    cfg = tiny_config()
    den = Denoiser(tiny_denoiser(cfg).unet)
    assert den.null_context.shape == (1, D) and den.context_dim == D


def test_pooled_embedding_starts_at_base_and_learns_the_condition():
    cfg = tiny_config()
    den = tiny_denoiser(cfg).eval()
    x, t, ctx, mask = _inputs(cfg)
    with torch.no_grad():
        before = den(x, t, ctx, mask)
    add_lora(den.unet, cfg.lora)
    assert den.unet.config.class_embed_type == "projection"
    with torch.no_grad():
        assert torch.equal(den(x, t, ctx, mask), before)  # zero-initialised output: the base UNet
    # the diffusion loss reaches it through the pooled context
    loss = diffusion_loss(den, x, ctx, mask, build_train_scheduler(cfg.diffusion),
                          cfg.diffusion.__class__(condition_dropout=0.0), torch.Generator().manual_seed(0))
    loss.backward()
    assert den.unet.class_embedding.linear_2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        den.unet.class_embedding.linear_2.weight.normal_()
        assert not torch.allclose(den(x, t, ctx, mask), before)
    emb = den.unet.class_embedding
    add_pooled_embedding(den.unet)  # idempotent: a loaded UNet keeps its trained embedding
    assert den.unet.class_embedding is emb and emb.linear_2.weight.requires_grad


def test_pooled_embedding_off_keeps_the_papers_unet():
    cfg = tiny_config().set("lora.pooled_embedding", False)
    den = tiny_denoiser(cfg)
    add_lora(den.unet, cfg.lora)
    assert den.unet.class_embedding is None


def test_finetune_base_trains_the_whole_unet_from_the_base():
    cfg = tiny_config().set("lora.finetune_base", True)
    den = tiny_denoiser(cfg).eval()
    x, t, ctx, mask = _inputs(cfg)
    with torch.no_grad():
        before = den(x, t, ctx, mask)
    add_lora(den.unet, cfg.lora)
    with torch.no_grad():
        assert torch.equal(den(x, t, ctx, mask), before)  # still starts at the base UNet
    names = {n for n, _ in trainable_parameters(den)}
    assert names == {n for n, _ in den.named_parameters()}  # base, adapter, pooled MLP, null context
    assert any("lora_" in n for n in names) and "unet.conv_in.weight" in names
