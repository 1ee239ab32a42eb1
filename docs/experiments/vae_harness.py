"""How few VAE steps keep what the judge sees: train_vae for N steps in one process, judge the
reconstructions of the ``val`` images (never test).

    THREADS=1 python docs/experiments/vae_harness.py --init /tmp/g2p-ttq/today/models/pretrain_conditioner \\
        --steps 200 400

The generator can at best draw what its VAE decodes, so the judge's species
accuracy on ``decode(encode(x))`` of real val images is the ceiling the VAE puts
on the downstream species accuracy. For each step count (a VAE trained from ``--init``
with the stage's schedule over that many steps) it prints that accuracy, the judge score of the
reconstruction with its own barcode, the reconstruction
error (MSE in [0, 1] pixels) and the process's CPU seconds so far; the real images give the
reference row (``steps 0`` = real images, not a VAE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("THREADS", "1")))


def main() -> None:
    from g2p.data.dataset import to_uint8, to_unit_range
    from g2p.evaluation import metrics as M
    from g2p.judge import Judge
    from g2p.model import G2PDiffusion
    from g2p.models.vae import decode, encode
    from g2p.train import stages
    from pipelines.ray_train import load_data

    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="a training-layout folder (e.g. models/pretrain_conditioner)")
    ap.add_argument("--steps", type=int, nargs="*", default=[], help="step counts to train and judge")
    ap.add_argument("--batch-size", type=int, default=0, help="train_vae.batch_size (0: the model's)")
    ap.add_argument("--lr", type=float, default=0.0, help="train_vae.lr (0: the model's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides: a fresh model from --init's config with them (vae.block_out_channels=...)")
    ap.add_argument("--as-is", action="store_true", help="also judge --init's own VAE (e.g. a trained recipe's)")
    a = ap.parse_args()
    model = G2PDiffusion.from_pretrained(a.init)
    train = load_data(ROOT / "outputs/prepared/train", ["train"], model.cfg.vae.image_size)
    val = load_data(ROOT / "outputs/prepared/val", ["val"], model.cfg.vae.image_size)
    judge = Judge.from_pretrained(str(ROOT / "models/judge"))
    bc = judge.embed_barcodes(list(val.barcode))
    names, protos = M.species_prototypes(bc.numpy(), val.species)

    def row(images: torch.Tensor, steps: int | str) -> dict:
        emb = judge.embed_images(images)
        hits = M.species_hits(emb.numpy(), val.species, names, protos)
        _, lo, hi = M.rate_with_ci(hits)
        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"vae_steps": steps, "species_acc": round(float(hits.mean()), 4), "ci": [round(lo, 4), round(hi, 4)],
                "score": round(float((emb * bc).sum(-1).mean()), 4), "cpu_s": round(r.ru_utime + r.ru_stime, 1)}

    print(json.dumps(row(val.images, 0)), flush=True)
    def judged(vae: torch.nn.Module, label: int | str) -> None:
        with torch.no_grad():
            x = to_unit_range(val.images)
            rec = torch.cat([to_uint8(decode(vae, encode(vae, x[i:i + 64]))) for i in range(0, len(x), 64)])
            err = float(((rec.float() - val.images.float()) / 255).pow(2).mean())
        print(json.dumps({**row(rec, label), "mse": round(err, 5)}), flush=True)

    if a.as_is:
        judged(model.vae, "init")
    for n in a.steps:  # a VAE per count, each from --init with the stage's schedule over n steps
        model = G2PDiffusion.from_pretrained(a.init)
        if a.set:
            import yaml

            cfg = model.cfg
            for kv in a.set:
                key, raw = kv.split("=", 1)
                cfg = cfg.set(key, yaml.safe_load(raw))
            torch.manual_seed(0)
            model = G2PDiffusion(cfg)
        tc = model.cfg.train_vae
        tc = dataclasses.replace(tc, steps=n, batch_size=a.batch_size or tc.batch_size, lr=a.lr or tc.lr)
        stages.train_vae(model, train, tc, progress=False)
        judged(model.vae, n)

if __name__ == "__main__":
    main()
