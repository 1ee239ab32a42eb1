"""Schedulers and step counts side by side on ``val``: species accuracy, CLIBDScore@1, seconds per image.

    python -m benchmarks sampling                  # the trained default model (make run)
    python -m benchmarks sampling --quick          # smoke run on random tiny components
    python -m benchmarks.bench_sampling --model models/g2pdiffusion --judge models/judge \\
        --data outputs/prepared/val --samples 2 --out reports/sampling.json

Every setting samples the SAME ``val`` barcodes (validation, never test:
nothing is tuned on test) from the same per-image seeds, with aligner
guidance on (the model's ``sampling.aligner_guidance_scale`` and CFG scale),
so each setting is compared with DDIM 25 paired, barcode by barcode, with a
species-clustered bootstrap interval. Per setting: species accuracy (the
judge's nearest species prototype, prototypes over every val record), the
judge's CLIBDScore of the first image (score@1), UNet evaluations per image
(steps x 2 with CFG) and wall seconds per image, timed in the same process
one setting after another.

The choice printed at the end: the cheapest setting (fewest UNet evaluations
per image) whose species accuracy is not worse than DDIM 25's -- the lower
end of the paired 95% interval of (setting - DDIM 25) above -``--margin``
(a non-inferiority margin, default 5 points) -- ties on cost broken by the
smaller paired loss of score@1 against DDIM 25 -- with DDIM 25 itself as the
fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS: tuple[tuple[str, int], ...] = (
    ("ddim", 25), ("ddim", 50), ("ddim", 10), ("dpmsolver++", 10), ("dpmsolver++", 15), ("dpmsolver++", 20),
    ("unipc", 10),
)
REFERENCE = ("ddim", 25)


def run_settings(pipe: Any, judge: Any, arrays: Any, settings: tuple[tuple[str, int], ...], samples: int,
                 seed: int, batch_images: int, reps: int, margin: float) -> dict[str, Any]:
    from g2p.evaluation import metrics as M
    from g2p.pipeline import generate_uint8

    barcodes = list(arrays.barcode)
    lat = [float(arrays.lat[i]) if arrays.has_place[i] else None for i in range(len(barcodes))]
    lon = [float(arrays.lon[i]) if arrays.has_place[i] else None for i in range(len(barcodes))]
    species = np.asarray(arrays.species, dtype=object)
    bc_emb = judge.embed_barcodes(barcodes)  # (B, D)
    names, protos = M.species_prototypes(bc_emb.numpy(), species)
    s = pipe.cfg.sampling
    generate_uint8(pipe, barcodes[:2], lat[:2], lon[:2], 1, seed, num_inference_steps=2)  # warm-up, untimed
    rows, per_barcode = [], {}
    for name, steps in settings:
        p = pipe.with_scheduler(name)
        t0 = time.perf_counter()
        imgs = generate_uint8(p, barcodes, lat, lon, samples, seed, batch_images, num_inference_steps=steps)
        sec = (time.perf_counter() - t0) / (len(barcodes) * samples)
        b, k = imgs.shape[:2]
        emb = judge.embed_images(imgs.reshape(b * k, *imgs.shape[2:])).reshape(b, k, -1)  # (B, k, D)
        hits = M.species_hits(emb.reshape(b * k, -1).numpy(), np.repeat(species, k), names, protos).reshape(b, k)
        score1 = (emb[:, 0] * bc_emb).sum(-1).numpy()  # (B,)
        per_barcode[(name, steps)] = (hits.mean(1), score1)
        unet = steps * (2 if s.guidance_scale != 1.0 else 1)
        rows.append({"scheduler": name, "steps": steps, "unet_evals_per_image": unet,
                     "species_accuracy": float(hits.mean()), "score@1": float(score1.mean()),
                     "seconds_per_image": round(sec, 4)})
        print(f"  {name:12s} {steps:3d} steps: species accuracy {hits.mean():.3f}, score@1 {score1.mean():.3f}, "
              f"{sec:.3f} s/image", flush=True)
    ref = per_barcode[REFERENCE]
    for r in rows:
        key = (r["scheduler"], r["steps"])
        acc, sc = per_barcode[key]
        r["species_accuracy_vs_ddim25"] = M.paired_difference(acc, ref[0], species, reps, seed)
        r["score@1_vs_ddim25"] = M.paired_difference(sc, ref[1], species, reps, seed)
        r["seconds_ratio_vs_ddim25"] = round(r["seconds_per_image"] / rows[0]["seconds_per_image"], 3)
    ok = [r for r in rows if r["species_accuracy_vs_ddim25"]["low"] > -margin]
    # ties on cost: the smaller paired loss of score@1 against DDIM 25, then the higher species accuracy
    chosen = min(ok, key=lambda r: (r["unet_evals_per_image"], -r["score@1_vs_ddim25"]["diff"],
                                    -r["species_accuracy"])) if ok else rows[0]
    return {"rows": rows, "chosen": {"scheduler": chosen["scheduler"], "steps": chosen["steps"]},
            "rule": f"fewest UNet evaluations per image with paired 95% lower bound of species accuracy "
                    f"vs DDIM 25 above -{margin}; ties: the smaller paired score@1 loss",
            "num_barcodes": len(barcodes), "num_species": len(names), "samples_per_barcode": samples,
            "cfg_scale": s.guidance_scale, "aligner_guidance_scale": s.aligner_guidance_scale,
            "torch_threads": torch.get_num_threads(), "micro_batch_size": pipe.micro_batch_size, "load_average": round(os.getloadavg()[0], 2)}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['num_barcodes']} val barcodes ({res['num_species']} species) x {res['samples_per_barcode']} "
          f"images, CFG {res['cfg_scale']}, aligner w {res['aligner_guidance_scale']}; intervals: paired, "
          f"species-clustered bootstrap 95%")
    print("| scheduler | steps | UNet evals/image | species accuracy | vs DDIM 25 [95% CI] | score@1 | "
          "vs DDIM 25 [95% CI] | s/image | time vs DDIM 25 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        a, b = r["species_accuracy_vs_ddim25"], r["score@1_vs_ddim25"]
        print(f"| {r['scheduler']} | {r['steps']} | {r['unet_evals_per_image']} | {r['species_accuracy']:.3f} | "
              f"{a['diff']:+.3f} [{a['low']:+.3f}, {a['high']:+.3f}] | {r['score@1']:.3f} | "
              f"{b['diff']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}] | {r['seconds_per_image']:.3f} | "
              f"{r['seconds_ratio_vs_ddim25']:.2f}x |")
    c = res["chosen"]
    print(f"\nchosen ({res['rule']}): {c['scheduler']} {c['steps']} steps")


def _quick() -> tuple[Any, Any, Any]:
    """Random-init tiny pipeline and judge on a few synthetic arrays: a smoke run, not figures."""
    from g2p.config import preset
    from g2p.judge import Judge
    from g2p.model import G2PDiffusion
    from g2p.pipeline import G2PDiffusionPipeline
    from tests.fixtures import two_species_arrays

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = G2PDiffusion(cfg)
    model.negative_bank = torch.randn(4, cfg.conditioner.hidden_size)
    return G2PDiffusionPipeline.from_model(model), Judge(cfg.judge).eval(), two_species_arrays(4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/g2pdiffusion")
    p.add_argument("--judge", default="models/judge")
    p.add_argument("--data", default="outputs/prepared/val")
    p.add_argument("--split", default="val")
    p.add_argument("--samples", type=int, default=2, help="images per barcode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--margin", type=float, default=0.05, help="non-inferiority margin on species accuracy")
    p.add_argument("--max-barcodes", type=int, default=0, help="0: every record of the split")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--micro-batch", type=int, default=0, help="images per network call (0: the model's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        pipe, judge, arrays = _quick()
        settings = (("ddim", 4), ("dpmsolver++", 2), ("unipc", 2), ("euler", 2))
        global REFERENCE
        REFERENCE = settings[0]
    else:
        from g2p.judge import Judge
        from g2p.pipeline import load_pipeline
        from pipelines.ray_train import load_data

        for path in (a.model, a.judge, a.data):
            if not Path(path).exists():
                print(f"bench_sampling: {path} is missing: run `make run` first (or pass --model/--judge/--data)")
                return 1
        pipe = load_pipeline(a.model)
        judge = Judge.from_pretrained(a.judge).eval()
        arrays = load_data(a.data, [a.split], pipe.cfg.vae.image_size)
        settings = SETTINGS
    if a.micro_batch:
        pipe.set_micro_batch_size(a.micro_batch)
    if a.max_barcodes:
        arrays = arrays.subset(np.arange(min(a.max_barcodes, len(arrays))))
    with torch.no_grad():
        res = run_settings(pipe, judge, arrays, settings, a.samples, a.seed, a.batch_images, a.reps, a.margin)
    print_table(res)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
