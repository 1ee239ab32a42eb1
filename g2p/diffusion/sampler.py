"""Guided sampling, Algorithm 1: our own loop over a diffusers scheduler.

diffusers' pipeline callbacks run after ``scheduler.step``, too late to change
the noise prediction, so the loop is ours. Guidance is applied once, to the
noise prediction (``condition_score``), which makes it valid for every
epsilon-predicting scheduler (DDPM, DDIM, ...) without branching on its class.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from g2p.diffusion.guidance import CondFn

__all__ = ["condition_score", "sample_latents"]


def condition_score(eps: Tensor, grad: Tensor, alpha_bar_t: Tensor | float, scale: float) -> Tensor:
    """Eq. 8 on the noise prediction: eps' = eps - sqrt(1 - gamma_t) * w * grad log p(c | x_t).

    Since eps = -sqrt(1 - gamma_t) * score, this adds w * grad log p(c | x_t)
    to the score (guided-diffusion's ``condition_score``).
    """
    return eps - (1.0 - torch.as_tensor(alpha_bar_t, dtype=eps.dtype)).sqrt() * scale * grad


@torch.no_grad()
def sample_latents(
    denoiser: torch.nn.Module,
    scheduler: SchedulerMixin,
    context: Tensor,
    context_mask: Tensor | None,
    pooled: Tensor | None,
    *,
    latent_shape: tuple[int, int, int],
    num_inference_steps: int,
    num_samples: int = 1,
    cfg_scale: float = 1.0,
    guidance_scale: float = 0.0,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
) -> Tensor:
    """Sample ``num_samples`` latents for each of B conditions, optionally guided.

    Notation:
        N = B * num_samples; sample i*num_samples + j belongs to condition i
        x_t      latents                                   # (N, C, h, w)
        c        pooled condition of each sample           # (N, d)
        eps_c    f_theta(x_t, t, context)
        eps_u    f_theta(x_t, t, null context)
        s, w     cfg_scale, guidance_scale (the paper's w)
        gamma_t  scheduler.alphas_cumprod[t]

    Per step (Algorithm 1, lines 4-7):
    1. eps_c (and eps_u in the same UNet pass when s != 1)
    2. eps = eps_u + s (eps_c - eps_u)                       (classifier-free)
    3. if w != 0: eps = eps - sqrt(1 - gamma_t) w cond_fn(x_t, t, c)   (eq. 8)
    4. x_{t-1} = scheduler.step(eps, t, x_t)

    With w == 0 (or no cond_fn) step 3 is skipped entirely -- no aligner
    forward or backward -- so the result is bitwise the unguided sample.
    All randomness comes from ``generator`` (initial noise, DDPM's per-step
    noise): same generator seed, same latents. ``scheduler`` is not mutated;
    a fresh copy from its config is stepped.
    """
    b, length, _ = context.shape  # (B, L, d)
    n = b * num_samples
    device, dtype = context.device, context.dtype
    guided = guidance_scale != 0.0 and cond_fn is not None
    if guided and pooled is None:
        raise ValueError("aligner guidance needs the pooled condition `pooled` (B, d)")
    use_cfg = cfg_scale != 1.0

    # 0. conditions per sample; CFG's null rows go in the same batch
    ctx = context.repeat_interleave(num_samples, dim=0)  # (N, L, d)
    mask = None if context_mask is None else context_mask.repeat_interleave(num_samples, dim=0)  # (N, L)
    c = None if pooled is None else pooled.repeat_interleave(num_samples, dim=0)  # (N, d)
    if use_cfg:
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.bool, device=device)
        null_ctx, null_mask = denoiser.null_condition(n, length)
        ctx = torch.cat([ctx, null_ctx.to(dtype)], dim=0)  # (2N, L, d)
        mask = torch.cat([mask.bool(), null_mask], dim=0)  # (2N, L)

    sched = scheduler.__class__.from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps, device=device)
    alphas_cumprod = sched.alphas_cumprod.to(device)
    if latents is None:
        gdev = generator.device if generator is not None else device
        latents = torch.randn((n, *latent_shape), generator=generator, device=gdev, dtype=dtype).to(device)
    x = latents * sched.init_noise_sigma  # (N, C, h, w)

    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        # 1. noise prediction(s), one UNet pass
        if use_cfg:
            eps_c, eps_u = denoiser(torch.cat([x_in, x_in]), t, ctx, mask).chunk(2)
            # 2. classifier-free guidance
            eps = eps_u + cfg_scale * (eps_c - eps_u)  # (N, C, h, w)
        else:
            eps = denoiser(x_in, t, ctx, mask)
        # 3. aligner guidance, applied once to eps
        if guided:
            grad = cond_fn(x, t.expand(n), c)  # (N, C, h, w)
            eps = condition_score(eps, grad, alphas_cumprod[t], guidance_scale)
        # 4. reverse step
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x
