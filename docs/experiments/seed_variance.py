"""Seed variance: how much of a difference between two trainings is the training seed alone?

    python docs/experiments/seed_variance.py run --seed 0 --model models/g2pdiffusion   # the pipeline's own model
    python docs/experiments/seed_variance.py run --seed 1
    python docs/experiments/seed_variance.py run --seed 2
    python docs/experiments/seed_variance.py compare

``run --seed S`` (S > 0) trains ``train_diffusion`` and ``train_aligner`` again with the stage commands
exactly as ``dvc.yaml`` writes them and ``train_diffusion.seed = train_aligner.seed = S`` (batch order, noise,
timesteps, LoRA/aligner initialisation), starting from the checkout's ``models/train_base`` and reading its
``outputs/latents`` and ``outputs/prepared`` (run ``dvc repro train_aligner train_judge`` first): everything
before train_diffusion is held fixed, so the spread is that of the generator's own training. ``--model``
scores an already trained pipeline instead (seed 0 is the checkout's). Each model is scored on ``val``
(never test) with the checkout's judge, every record, ``--samples`` images with the same image seeds for
every model: the judge's species decision and score@1 (``time_to_quality.score_val``). Results go to
``docs/experiments/seed_variance/seed<S>.npz/.json``.

``compare`` prints, per seed, val species accuracy and score@1, their mean, standard deviation and range
over seeds, and each seed's paired difference to seed 0 (same records, same image seeds) with a 95%
interval that resamples species: a between-seed difference is what two trainings of one recipe differ by.
Not part of ``make run`` (each seed is about 16 minutes of training on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = ROOT / "docs" / "experiments" / "seed_variance"
STAGES = ("train_diffusion", "train_aligner")
LINKED = ("outputs/latents", "outputs/prepared", "models/train_base")


def train(seed: int, work: Path) -> dict:
    from time_to_quality import cpu_seconds

    wd = work / f"seed{seed}"
    if wd.exists():
        shutil.rmtree(wd)
    for rel in LINKED:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(ROOT / rel, wd / rel)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in STAGES:
        params[stage]["seed"] = seed
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = {}
    for stage in STAGES:
        cmd = " ".join(spec[stage]["cmd"].split())
        c0, t0 = cpu_seconds(), time.time()
        print(f"[seed {seed}] {stage}: {cmd}", flush=True)
        with open(wd / f"{stage}.log", "w") as log:
            rc = subprocess.run(shlex.split(cmd), cwd=wd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"[seed {seed}] {stage} failed ({rc}): see {wd / f'{stage}.log'}")
        c1 = cpu_seconds()
        stages[stage] = {"wall_s": round(time.time() - t0, 1),
                         "cpu_s": round(c1["user"] + c1["kernel"] - c0["user"] - c0["kernel"], 1)}
        print(f"[seed {seed}] {stage}: {json.dumps(stages[stage])}", flush=True)
    return {"stages": stages, "model": str(wd / "models" / "g2pdiffusion")}


def cmd_run(a: argparse.Namespace) -> None:
    from time_to_quality import score_val

    RESULTS.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": a.seed, "samples": a.samples, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "host_cpus": os.cpu_count()}
    if a.model:
        summary["model"] = a.model
    else:
        if a.seed == 0:
            raise SystemExit("--seed 0 is the checkout's model: pass --model models/g2pdiffusion")
        summary.update(train(a.seed, Path(a.work)))
    res = score_val(ROOT / summary["model"] if not Path(summary["model"]).is_absolute() else summary["model"],
                    ROOT / "models" / "judge", a.samples, 0, a.threads)["val"]
    np.savez(RESULTS / f"seed{a.seed}.npz", **res)
    summary["val"] = {"species_accuracy": float(res["hit"].mean()), "score@1": float(res["score"].mean()),
                      "records": int(len(res["hit"]))}
    (RESULTS / f"seed{a.seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["val"]))


def cmd_compare(a: argparse.Namespace) -> None:
    from g2p.evaluation import metrics as M

    runs = {}
    for p in sorted(RESULTS.glob("seed*.npz")):
        d = np.load(p)
        runs[int(p.stem[4:])] = {k: d[k] for k in d.files}
    if 0 not in runs or len(runs) < 2:
        raise SystemExit(f"need seed 0 and at least one more in {RESULTS} (have {sorted(runs)})")
    ref = runs[0]
    print("| seed | val species accuracy | diff to seed 0 [95%] | val score@1 | diff to seed 0 [95%] |")
    print("|---|---|---|---|---|")
    for s, r in sorted(runs.items()):
        if list(r["processid"]) != list(ref["processid"]):
            raise SystemExit(f"seed {s}: scored on other records than seed 0")
        cells = [str(s)]
        for key, fmt in (("hit", ".1%"), ("score", ".3f")):
            cells.append(f"{r[key].mean():{fmt}}")
            if s == 0:
                cells.append("")
                continue
            d = M.paired_difference(r[key], ref[key], ref["species"], 1000, 0)
            cells.append(f"{d['diff']:+{fmt}} [{d['low']:+{fmt}}, {d['high']:+{fmt}}]")
        print("| " + " | ".join(cells) + " |")
    for key, label, fmt in (("hit", "species accuracy", ".1%"), ("score", "score@1", ".3f")):
        m = np.array([r[key].mean() for r in runs.values()])
        print(f"\n{label} over {len(m)} seeds: mean {m.mean():{fmt}}, sd {m.std(ddof=1):{fmt}}, "
              f"range {m.max() - m.min():{fmt}}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--model", default=None, help="score this pipeline folder instead of training one")
    r.add_argument("--work", default="/tmp/g2p-seeds")
    r.add_argument("--samples", type=int, default=2, help="images per val record")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    sub.add_parser("compare")
    a = ap.parse_args(argv)
    {"run": cmd_run, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
