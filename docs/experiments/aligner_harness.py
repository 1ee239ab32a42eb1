"""Aligner guidance sweep: train the aligner on a generator folder, then species accuracy per w.

    python docs/experiments/aligner_harness.py MODEL_DIR ALIGNER_STEPS OUT_DIR 0,5,10,20
"""
import sys, dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(Path(__file__).parent))
import torch
torch.set_num_threads(1)
from species_harness import evaluate
from g2p.model import G2PDiffusion
from g2p.judge import Judge
from g2p.train import stages
from pipelines.ray_train import load_data

src, steps, save = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ws = [float(x) for x in sys.argv[4].split(",")]
m = G2PDiffusion.from_pretrained(src)
judge = Judge.from_pretrained(ROOT / "models/judge")
test = load_data(ROOT / "outputs/prepared/val", ["val"], m.cfg.vae.image_size)  # choose on val, never test
if steps > 0:
    train = load_data(ROOT / "outputs/prepared/train", ["train"], m.cfg.vae.image_size)
    lat = stages.encode_latents(m, train.images)
    stages.train_aligner(m, train, dataclasses.replace(m.cfg.train_aligner, steps=steps), latents=lat, progress=False)
    m.save_pretrained(save)
for w in ws:
    evaluate(m, judge, test, n=4, cfg_scale=5.0, guidance=w, tag=f"aligner{steps}")
