"""Model pieces: conditioner, VAE, UNet (+LoRA), aligner."""
