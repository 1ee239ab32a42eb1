"""train_diffusion variants in one process, judged on ``val`` (never test): the quick pilot of time_to_quality.py.

    python docs/experiments/species_harness.py --init /tmp/g2p-ttq/today/models/train_vae --name scratch800 \\
        --set train_diffusion.steps=800 diffusion.loss_weighting=min_snr

Loads ``--init`` (a training-layout folder, e.g. a recipe's ``models/train_vae``
to train the conditional UNet from scratch, or ``models/train_base``), applies
the ``--set`` overrides (any config key, e.g. ``train_diffusion.lr``,
``diffusion.prediction_type``), trains ``stages.train_diffusion`` in this
process with ``THREADS`` torch threads (two pilots side by side with one
thread each share two cores), and scores ``val`` without aligner guidance
(no aligner is trained here) with :func:`time_to_quality.score_val`. Prints
the process's CPU seconds (user + kernel, this process only) and writes
``time_to_quality/pilot_NAME.{json,npz}`` for ``time_to_quality.py compare``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(int(os.environ.get("THREADS", "1")))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    from g2p.model import G2PDiffusion
    from g2p.pipeline import G2PDiffusionPipeline
    from g2p.train import stages
    from pipelines.ray_train import load_data
    from time_to_quality import save_result, score_val

    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--samples", type=int, default=2)
    a = ap.parse_args()
    model = G2PDiffusion.from_pretrained(a.init)
    for kv in a.set:
        key, raw = kv.split("=", 1)
        model.cfg = model.cfg.set(key, yaml.safe_load(raw))
    train = load_data(ROOT / "outputs/prepared/train", ["train"], model.cfg.vae.image_size)
    c0, t0 = cpu(), time.time()
    latents = stages.encode_latents(model, train.images)
    stages.train_diffusion(model, train, model.cfg.train_diffusion, latents=latents, progress=False)
    out = {"name": f"pilot_{a.name}", "set": a.set, "init": a.init, "threads": torch.get_num_threads(),
           "cpu_s": round(cpu() - c0, 1), "kernel_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
           "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out), flush=True)
    pipe = G2PDiffusionPipeline.from_model(model)
    res = score_val(pipe, ROOT / "models/judge", a.samples, 0, torch.get_num_threads(), aligner_guidance_scale=0.0)
    save_result(f"pilot_{a.name}", out, res, a.samples)


if __name__ == "__main__":
    main()
