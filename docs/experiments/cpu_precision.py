"""One training step's CPU time on this CPU: fp32 against bf16 autocast, NCHW against channels-last.

The `default` preset's VAE objective and conditional (LoRA) diffusion objective, forward and
backward, on random inputs of the stages' batch size (16), one torch thread; each figure is the
least process CPU time of 5 repeats after a warm-up (issue 14: is lower precision a lever on CPU?).

    python docs/experiments/cpu_precision.py [--threads 1] [--batch 16]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from g2p.config import preset
from g2p.diffusion.schedule import build_train_scheduler
from g2p.model import G2PDiffusion
from g2p.train.stages import ConditionalObjective, VAEObjective


def least_cpu(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    cfg = preset("default")
    model = G2PDiffusion(cfg)
    model.add_lora()
    size = cfg.vae.image_size
    x = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        z = model.vae.encode(x).latent_dist.sample()
    ids, mask = model.tokenize(["".join(random.choice("ACGT") for _ in range(658)) for _ in range(args.batch)])
    lat, lon, has_place = torch.rand(args.batch) * 50, torch.rand(args.batch) * 50, torch.ones(args.batch, dtype=bool)
    vae = VAEObjective(model.vae, cfg.vae)
    cond = ConditionalObjective(model.conditioner, model.denoiser, build_train_scheduler(cfg.diffusion), cfg.diffusion)

    def step(name: str, bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = vae(x)["loss"] if name == "vae" else cond(ids, mask, lat, lon, has_place, z)
            loss.backward()
        return run

    print(f"{'objective':<22}{'fp32 CPU-s':>12}{'bf16 CPU-s':>12}{'fp32/bf16':>11}")
    for layout in ("NCHW", "channels-last"):
        if layout == "channels-last":
            model.vae.to(memory_format=torch.channels_last)
            model.denoiser.to(memory_format=torch.channels_last)
            x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
        for name in ("vae", "diffusion"):
            fp32, bf16 = least_cpu(step(name, False)), least_cpu(step(name, True))
            print(f"{name + ' ' + layout:<22}{fp32:>12.3f}{bf16:>12.3f}{fp32 / bf16:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
