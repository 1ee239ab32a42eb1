"""The presets: values of :class:`g2p.config.G2PConfig`, never separate code paths.

``default`` is the dataclasses' own defaults (the embedded CPU run, stated in
full in ``params.yaml``); ``tiny`` sizes every stage for tests; ``paper`` holds
the paper's sizes and optimiser settings, with Stable Diffusion loaded from a
local diffusers folder; ``large`` is BIOSCAN-5M's scale, metadata only.
Choose one with :func:`g2p.config.preset`.
"""

from __future__ import annotations

from g2p.config import (
    AlignerConfig,
    ConditionerConfig,
    DataConfig,
    DiffusionConfig,
    EvaluateConfig,
    G2PConfig,
    JudgeConfig,
    LoRAConfig,
    SamplingConfig,
    TRAIN_STAGES,
    TokenizerConfig,
    TrainConfig,
    TraitReaderConfig,
    UNetConfig,
    VAEConfig,
)


def _tiny() -> G2PConfig:
    return G2PConfig(
        data=DataConfig(
            num_orders=2, families_per_order=2, genera_per_family=1, species_per_genus=2,
            unseen_species_per_genus=1, train_per_species=3, val_per_species=1,
            test_per_species=2, key_unseen_per_species=1, val_unseen_per_species=1,
            test_unseen_per_species=1, pretrain_records=8, image_size=64,
        ),
        tokenizer=TokenizerConfig(k=4, stride=4),
        conditioner=ConditionerConfig(
            hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            max_position_embeddings=200, env_hidden_size=16,
        ),
        vae=VAEConfig(image_size=32, block_out_channels=(8, 16), norm_num_groups=4),
        unet=UNetConfig(
            block_out_channels=(16, 32), cross_attention_levels=(False, True),
            attention_head_dim=4, norm_num_groups=4,
        ),
        lora=LoRAConfig(rank=4, alpha=4, finetune_base=False),
        aligner=AlignerConfig(width=32, num_layers=1, num_heads=2),
        sampling=SamplingConfig(scheduler="ddim", steps=4, guidance_scale=3.0, aligner_guidance_scale=1.0, negative_bank_size=8),
        **{stage: TrainConfig(steps=20, batch_size=8, lr=1e-3, warmup_steps=2, log_every=5, checkpoint_every=10)
           for stage in TRAIN_STAGES},
        judge=JudgeConfig(image_size=32, channels=(8, 16), embed_dim=16, dna_hidden_size=16, dna_layers=1,
                          dna_heads=2, dna_intermediate_size=32),
        train_judge=TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, log_every=5, checkpoint_every=10),
        trait_reader=TraitReaderConfig(image_size=32, channels=(8, 16), pool=2, hidden=32, prior_renders=16),
        train_trait_reader=TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, log_every=5,
                                       checkpoint_every=10),
        evaluate=EvaluateConfig(barcodes_per_species=1, num_samples=2, ks=(1, 2), bootstrap_reps=50,
                                threshold_pairs=0, batch_barcodes=4,
                                vary_barcodes=2, vary_samples=1, mutation_rates=(0.0, 0.5), latitudes=(0.0, 60.0),
                                interpolation_steps=(0.0, 0.5, 1.0), bergmann_species=3, bergmann_samples=2),
    )


def _default() -> G2PConfig:
    return G2PConfig()


def _paper() -> G2PConfig:
    return G2PConfig(
        data=DataConfig(image_size=256),
        tokenizer=TokenizerConfig(k=3, stride=3),
        conditioner=ConditionerConfig(
            hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
            max_position_embeddings=1024, env_hidden_size=768,
        ),
        vae=VAEConfig(
            image_size=256, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            norm_num_groups=32, scaling_factor=0.18215,
            pretrained_path="models/stable-diffusion",
        ),
        unet=UNetConfig(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_levels=(True, True, True, False), attention_head_dim=8,
            norm_num_groups=32, pretrained_path="models/stable-diffusion",
        ),
        lora=LoRAConfig(rank=16, alpha=16, pooled_embedding=False, finetune_base=False),
        diffusion=DiffusionConfig(beta_schedule="scaled_linear"),
        aligner=AlignerConfig(patch_size=2, width=768, num_layers=6, num_heads=12),
        sampling=SamplingConfig(scheduler="ddim", steps=50, guidance_scale=3.0, aligner_guidance_scale=1.0, negative_bank_size=256),
        pretrain_conditioner=TrainConfig(steps=100_000, batch_size=128, lr=1e-4, warmup_steps=1000),
        train_vae=TrainConfig(steps=0, batch_size=16, lr=1e-5),  # loaded from Stable Diffusion
        train_base=TrainConfig(steps=0, batch_size=128, lr=1e-5),  # loaded from Stable Diffusion
        train_diffusion=TrainConfig(steps=100_000, batch_size=128, lr=1e-5, warmup_steps=500,
                                    ema_decay=0.9999, log_every=50, checkpoint_every=5000),
        train_aligner=TrainConfig(steps=20_000, batch_size=128, lr=1e-4, warmup_steps=500),
        # CLIBD's towers are ViT-B/16 and a 12-layer BarcodeBERT, 768-d: our judge at that width
        judge=JudgeConfig(image_size=224, channels=(64, 128, 256, 512, 768), embed_dim=768, dna_hidden_size=768,
                          dna_layers=12, dna_heads=12, dna_intermediate_size=3072),
        train_judge=TrainConfig(steps=20_000, batch_size=128, lr=1e-4, warmup_steps=500),
        trait_reader=TraitReaderConfig(image_size=128, channels=(32, 64, 128, 256)),
        train_trait_reader=TrainConfig(steps=5_000, batch_size=128, lr=1e-3, warmup_steps=200),
        evaluate=EvaluateConfig(barcodes_per_species=0, max_species=0, num_samples=100, ks=(1, 5, 10, 20, 50, 100),
                                batch_barcodes=1, vary_barcodes=10, vary_samples=4),
    )


def _large() -> G2PConfig:
    """BIOSCAN-5M's scale (~5.15 M metadata rows, ~11.5 k seen species), metadata only."""
    return G2PConfig(
        data=DataConfig(
            num_orders=16, families_per_order=40, genera_per_family=6, species_per_genus=3,
            unseen_species_per_genus=1, heldout_species_per_genus=1, train_per_species=25,
            val_per_species=1, test_per_species=3, key_unseen_per_species=10,
            val_unseen_per_species=2, test_unseen_per_species=2, other_heldout_per_species=20,
            pretrain_records=4_677_756, metadata_only=True,
        ),
    )


PRESETS = {"tiny": _tiny, "default": _default, "paper": _paper, "large": _large}
