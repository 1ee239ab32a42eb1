"""Time to quality: train a recipe with the pipeline's own stage commands, then score it on ``val``.

    python docs/experiments/time_to_quality.py run --name today
    python docs/experiments/time_to_quality.py run --name no_base --set train_base.steps=0 train_diffusion.steps=2000
    python docs/experiments/time_to_quality.py run --name passive --env OMP_WAIT_POLICY=PASSIVE
    python docs/experiments/time_to_quality.py compare --ref today

``run`` copies the checkout's ``params.yaml`` with the recipe's overrides into
``--work/NAME`` and runs the training stages' commands exactly as ``dvc.yaml``
writes them (pretrain_conditioner, train_vae, encode_latents, train_base,
train_diffusion, train_aligner), reading the checkout's ``outputs/prepared``
(``dvc repro prepare`` first). Around each stage it reads the machine's CPU
counters (``/proc/stat``: user and kernel seconds of every process, so run it
alone on the box) and the wall clock. Then it scores the final model on
``val`` -- never on test -- with the checkout's trained
judge (``models/judge``, trained on real images only, so the same ruler for
every recipe): every record, ``--samples`` images each with fixed seeds, the
model's own sampling settings; per record the judge's species decision
(against the split's species prototypes, as the evaluate stage does) and its
score for the record's barcode (score@1). Per-record results go to
``RESULTS/NAME.npz``, the summary to ``RESULTS/NAME.json``.

``compare`` prints one Markdown row per recipe: training CPU-seconds (all
training stages), the ratio to ``--ref``, and val species accuracy and
score@1 with the paired difference to ``--ref`` (same records, same seeds)
and its 95% interval from a bootstrap over species.
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
RESULTS = ROOT / "docs" / "experiments" / "time_to_quality"
TRAINING = ("pretrain_conditioner", "train_vae", "encode_latents", "train_base", "train_diffusion", "train_aligner")
SPLITS = ("val",)  # the prepared val group (seen species); val_unseen is not prepared with images


def cpu_seconds() -> dict[str, float]:
    """The machine's busy CPU seconds so far: user (incl. nice) and kernel (system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return {"user": (user + nice) / tick, "kernel": (system + irq + softirq) / tick}


def _set(tree: dict, dotted: str, raw: str) -> None:
    value = yaml.safe_load(raw)
    *path, last = dotted.split(".")
    node = tree
    for p in path:
        if p not in node:
            raise KeyError(f"--set {dotted}: no section {p!r} in params.yaml")
        node = node[p]
    if last not in node:
        raise KeyError(f"--set {dotted}: no key {last!r} in params.yaml section {'.'.join(path)!r}")
    node[last] = value


def stage_commands() -> dict[str, str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {s: " ".join(spec[s]["cmd"].split()) for s in TRAINING}


def train(name: str, overrides: list[str], env_kv: list[str], work: Path) -> dict:
    wd = work / name
    if wd.exists():
        shutil.rmtree(wd)
    (wd / "outputs").mkdir(parents=True)
    os.symlink(ROOT / "outputs" / "prepared", wd / "outputs" / "prepared")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for kv in overrides:
        key, raw = kv.split("=", 1)
        _set(params, key, raw)
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    env.update(dict(kv.split("=", 1) for kv in env_kv))
    stages = {}
    for stage, cmd in stage_commands().items():
        c0, t0 = cpu_seconds(), time.time()
        print(f"[{name}] {stage}: {cmd}", flush=True)
        with open(wd / f"{stage}.log", "w") as log:
            rc = subprocess.run(shlex.split(cmd), cwd=wd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        c1, wall = cpu_seconds(), time.time() - t0
        if rc != 0:
            raise SystemExit(f"[{name}] {stage} failed ({rc}): see {wd / f'{stage}.log'}")
        row = {"wall_s": round(wall, 1), "user_s": round(c1["user"] - c0["user"], 1),
               "kernel_s": round(c1["kernel"] - c0["kernel"], 1)}
        row["cpu_s"] = round(row["user_s"] + row["kernel_s"], 1)
        stages[stage] = row
        print(f"[{name}] {stage}: {json.dumps(row)}", flush=True)
    return {"stages": stages, "cpu_s": round(sum(r["cpu_s"] for r in stages.values()), 1),
            "kernel_s": round(sum(r["kernel_s"] for r in stages.values()), 1),
            "wall_s": round(sum(r["wall_s"] for r in stages.values()), 1)}


def score_val(model: Path | object, judge_dir: Path, samples: int, seed: int, threads: int,
              **knobs: object) -> dict[str, dict]:
    """Per record of each val split: species hit rate and mean judge score over ``samples`` images.

    ``model``: a pipeline folder or a loaded pipeline; ``knobs`` override its sampling settings.
    """
    import torch

    torch.set_num_threads(threads)
    from g2p.evaluation import metrics as M
    from g2p.judge import Judge
    from g2p.pipeline import generate_uint8, load_pipeline
    from pipelines.ray_train import load_data

    pipe = load_pipeline(str(model)) if isinstance(model, (str, Path)) else model
    judge = Judge.from_pretrained(str(judge_dir))
    out = {}
    for split in SPLITS:
        arr = load_data(ROOT / "outputs" / "prepared" / split, [split], pipe.cfg.vae.image_size)
        lat = [float(a) if h else None for a, h in zip(arr.lat, arr.has_place)]
        lon = [float(a) if h else None for a, h in zip(arr.lon, arr.has_place)]
        n, t0, hits, scores = len(arr.barcode), time.time(), [], []
        bc = judge.embed_barcodes(list(arr.barcode))  # (n, D)
        names, protos = M.species_prototypes(bc.numpy(), arr.species)
        step = 32
        for i in range(0, n, step):
            sl = slice(i, min(n, i + step))
            imgs = generate_uint8(pipe, list(arr.barcode[sl]), lat[sl], lon[sl], samples, seed,
                                  seed_index=list(range(sl.start, sl.stop)), **knobs)  # (b, s, 3, H, W)
            b = imgs.shape[0]
            emb = judge.embed_images(imgs.flatten(0, 1)).reshape(b, samples, -1)
            h = M.species_hits(emb.flatten(0, 1).numpy(), np.repeat(arr.species[sl], samples), names, protos)
            hits.append(h.reshape(b, samples).mean(1))
            scores.append((emb * bc[sl][:, None]).sum(-1).mean(1).numpy())
            done = sl.stop
            rate = done / max(time.time() - t0, 1e-9)
            print(f"  {split}: {done}/{n} records, {rate:.2f}/s, ETA {(n - done) / rate:.0f} s", flush=True)
        out[split] = {"processid": np.asarray(arr.processid).astype(str),
                      "species": np.asarray(arr.species).astype(str),
                      "hit": np.concatenate(hits), "score": np.concatenate(scores)}
    return out


def cmd_run(a: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    summary: dict = {"name": a.name, "set": a.set, "env": a.env, "host_cpus": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    if not a.eval_only:
        summary.update(train(a.name, a.set, a.env, work))
        (RESULTS / f"{a.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    else:
        summary = json.loads((RESULTS / f"{a.name}.json").read_text())
    res = score_val(work / a.name / "models" / "g2pdiffusion", ROOT / "models" / "judge", a.samples, a.seed,
                    a.threads)
    save_result(a.name, summary, res, a.samples)


def save_result(name: str, summary: dict, res: dict[str, dict], samples: int) -> None:
    """``RESULTS/NAME.npz`` (per record, for ``compare``) and ``RESULTS/NAME.json`` (``summary`` + val means)."""
    np.savez(RESULTS / f"{name}.npz", **{f"{s}.{k}": v for s, d in res.items() for k, v in d.items()})
    summary["val"] = {s: {"species_acc": float(d["hit"].mean()), "score1": float(d["score"].mean()),
                          "records": len(d["hit"])} for s, d in res.items()}
    summary["samples"] = samples
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["val"]), flush=True)


def _load(name: str) -> tuple[dict, dict]:
    z = np.load(RESULTS / f"{name}.npz", allow_pickle=False)
    return json.loads((RESULTS / f"{name}.json").read_text()), {k: z[k] for k in z.files}


def cmd_compare(a: argparse.Namespace) -> None:
    from g2p.evaluation.metrics import paired_difference

    ref_s, ref = _load(a.ref)
    names = a.names or sorted(p.stem for p in RESULTS.glob("*.json"))
    print("| recipe | training CPU-s (kernel) | x ref | wall s | " +
          " | ".join(f"{s} species acc (diff [95% CI])" for s in SPLITS) + " | val score@1 (diff [95% CI]) |")
    print("|---|---|---|---|" + "---|" * (len(SPLITS) + 1))
    for n in names:
        s, r = _load(n)
        cells = [n, f"{s['cpu_s']:.0f} ({s['kernel_s']:.0f})", f"{s['cpu_s'] / ref_s['cpu_s']:.2f}",
                 f"{s['wall_s']:.0f}"]
        for split, key in [(sp, "hit") for sp in SPLITS] + [("val", "score")]:
            assert (r[f"{split}.processid"] == ref[f"{split}.processid"]).all(), "different records"
            d = paired_difference(r[f"{split}.{key}"], ref[f"{split}.{key}"], clusters=r[f"{split}.species"],
                                  reps=2000)
            val = r[f"{split}.{key}"].mean()
            fmt = (lambda x: f"{100 * x:.1f}") if key == "hit" else (lambda x: f"{x:.3f}")
            sign = "+" if d["diff"] >= 0 else ""
            cells.append(f"{fmt(val)} ({sign}{fmt(d['diff'])} [{fmt(d['low'])}, {fmt(d['high'])}])")
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml overrides")
    r.add_argument("--env", nargs="*", default=[], metavar="VAR=VALUE", help="environment of the stage commands")
    r.add_argument("--work", default="/tmp/g2p-ttq", help="scratch folder for the recipes' models")
    r.add_argument("--samples", type=int, default=4, help="images per val record")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the val scoring")
    r.add_argument("--eval-only", action="store_true", help="score an already trained recipe again")
    c = sub.add_parser("compare")
    c.add_argument("--ref", required=True)
    c.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    cmd_run(a) if a.cmd == "run" else cmd_compare(a)


if __name__ == "__main__":
    main()
