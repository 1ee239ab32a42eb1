"""Diffusion: noise schedule, losses, guidance contract and the guided sampler (Algorithm 1)."""
