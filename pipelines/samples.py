"""A sample sheet from a trained generator: one row per species, the real image first.

    python -m pipelines.samples --model models/g2pdiffusion \\
        --data outputs/prepared/test --out docs/samples.png

Rows are the first record of the first ``--species`` test species (sorted
names); columns the real image, then ``--n`` samples for its barcode and
place, fixed seed (the same panel :mod:`pipelines.stage` logs to MLflow).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from g2p.pipeline import load_pipeline
    from pipelines.ray_train import load_data
    from pipelines.stage import fixed_conditions, sample_sheet

    p = argparse.ArgumentParser(description="Write a sample sheet (real image + samples per species).")
    p.add_argument("--model", default="models/g2pdiffusion")
    p.add_argument("--data", default="outputs/prepared/test")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="docs/samples.png")
    p.add_argument("--species", type=int, default=6)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the checkpoint's sampling.steps")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model)
    arrays = load_data(a.data, [a.split], pipe.cfg.vae.image_size)
    sheet = sample_sheet(pipe, arrays, n_species=a.species, n=a.n, seed=a.seed, steps=a.steps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    rows = [str(arrays.species[i]) for i in fixed_conditions(arrays, a.species)]
    print(json.dumps({"out": a.out, "species": rows, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
