"""Quick species-accuracy experiments: train_diffusion variants from models/train_base, judge eval."""
import sys, time, json, dataclasses, argparse
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
from g2p.model import G2PDiffusion
from g2p.pipeline import G2PDiffusionPipeline, generate_uint8
from g2p.judge import Judge
from g2p.train import stages
from g2p.evaluation import metrics as M
from pipelines.ray_train import load_data
from pipelines.evaluate import select_barcodes

def evaluate(model, judge, test, n=2, cfg_scale=3.0, steps=25, max_species=36, seed=0, guidance=0.0, tag=""):
    pipe = G2PDiffusionPipeline.from_model(model)
    sel = select_barcodes(test.species, 1, max_species)
    bcs = [test.barcode[i] for i in sel]
    lat = [float(test.lat[i]) if test.has_place[i] else None for i in sel]
    lon = [float(test.lon[i]) if test.has_place[i] else None for i in sel]
    t = time.time()
    imgs = generate_uint8(pipe, bcs, lat, lon, n, seed, num_inference_steps=steps, guidance_scale=cfg_scale,
                          aligner_guidance_scale=guidance)
    all_bc = judge.embed_barcodes(list(test.barcode))
    names, protos = M.species_prototypes(all_bc.numpy(), test.species)
    b, k = imgs.shape[:2]
    emb = judge.embed_images(imgs.reshape(b * k, *imgs.shape[2:])).reshape(b, k, -1)
    sp = np.repeat(test.species[sel], k)
    hits = M.species_hits(emb.reshape(b * k, -1).numpy(), sp, names, protos)
    bc = all_bc[torch.as_tensor(sel)]
    sc = (emb * bc[:, None]).sum(-1).numpy()
    out = {"tag": tag, "cfg": cfg_scale, "w": guidance, "species_acc": float(hits.mean()), "score": float(sc.mean()),
           "sec": round(time.time() - t, 1)}
    print(json.dumps(out), flush=True)
    return out, imgs

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default=str(ROOT / "models/train_base"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--cfgs", default="3")
    ap.add_argument("--save", default="")
    ap.add_argument("--tag", default="")
    ap.add_argument("--lora-only", action="store_true", help="lora.finetune_base=false (the old default)")
    a = ap.parse_args()
    model = G2PDiffusion.from_pretrained(a.init)
    for kv in a.set:  # e.g. diffusion.timestep_sampling=logit_normal
        key, val = kv.split("=", 1)
        try:
            value = json.loads(val)
        except json.JSONDecodeError:
            value = val
        model.cfg = model.cfg.set(key, value)
    cfg = model.cfg
    judge = Judge.from_pretrained(f"{ROOT}/models/judge")
    test = load_data(f"{ROOT}/outputs/prepared/val", ["val"], cfg.vae.image_size)  # choose on val, never test
    if not a.eval_only:
        train = load_data(f"{ROOT}/outputs/prepared/train", ["train"], cfg.vae.image_size)
        lat = stages.encode_latents(model, train.images)
        # the whole UNet trains unless --lora-only (lora.finetune_base, default on)
        model.cfg = model.cfg.set("lora.finetune_base", not a.lora_only)
        tc = dataclasses.replace(cfg.train_diffusion, steps=a.steps, lr=a.lr)
        t = time.time()
        stages.train_diffusion(model, train, tc, latents=lat, progress=False)
        print("train s", round(time.time() - t), flush=True)
        if a.save:
            model.save_pretrained(a.save)
    for c in [float(x) for x in a.cfgs.split(",")]:
        evaluate(model, judge, test, cfg_scale=c, tag=a.tag)
