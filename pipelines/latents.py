"""DVC stage ``encode_latents``: prepared images -> VAE latents, computed once, in Ray Data actors.

    python -m pipelines.latents --model models/train_vae --prepared outputs/prepared --out outputs/latents

The VAE of ``--model`` (the trained one, or the pretrained one of the
``paper`` preset) is loaded once on the driver and shipped to a pool of Ray
Data actors as its diffusers config plus safetensors bytes; each actor encodes
batches of the streamed image shards (on a GPU when ``ray.use_gpu``, under
bf16 autocast; on one CPU core otherwise) and the latents are written as
their own sharded dataset (:mod:`pipelines.shards`, column ``latent``; the
manifest records shape, dtype, the latent scale and the VAE's version).
train_base, train_diffusion and train_aligner read these latents: no
training worker encodes the data set, at start or after a restart.

Keyed by the VAE's version (:func:`g2p.models.vae.vae_version`, a hash of
its config and weights): the training workers refuse latents of another VAE,
and with an object store as ``ray.storage_path`` the files live under
``<storage_path>/latents/<vae version>-<prepared key>/<group>`` with a
completion marker, so rerunning the stage with the same VAE and data (after
a change elsewhere) finds them and encodes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import shards, storage

GROUPS = ("train",)
MARKER = "_manifest.json"


class Encoder:
    """A Ray Data actor: image bytes -> latent bytes with one VAE (built once per actor)."""

    def __init__(self, vae_config: dict[str, Any], weights: Any, image_size: int, device: str,
                 dtype: str) -> None:
        import ray
        import torch
        from diffusers import AutoencoderKL
        from safetensors.torch import load

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        if device == "cpu":
            torch.set_num_threads(1)  # one core per actor: the pool spreads over the cores
        self.vae = AutoencoderKL.from_config(vae_config)
        self.vae.load_state_dict(load(weights))
        self.vae.to(device).eval()
        self.device, self.dtype, self.size = torch.device(device), dtype, image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from g2p.data.dataset import to_unit_range
        from g2p.models.vae import encode

        x = torch.from_numpy(shards.unpack(batch["image"], (3, self.size, self.size), "uint8"))
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.device.type == "cuda"):
            z = encode(self.vae, to_unit_range(x).to(self.device))  # (B, C, h, w), scaled
        out = {k: batch[k] for k in shards.META_COLUMNS}
        out["latent"] = shards.pack(z.float().cpu().numpy().astype(self.dtype))
        return out


def _marker(loc: str) -> str:
    return storage.join(loc, MARKER)


def _read_marker(loc: str) -> dict[str, Any] | None:
    fs, path = storage.filesystem(_marker(loc))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise storage.StorageError(f"{loc}: storage unreachable ({e})") from None


def encode_group(prepared: Path, out: Path, group: str, vae: Any, *, storage_path: str, use_gpu: bool,
                 batch_size: int) -> dict[str, Any]:
    """Latents of one prepared group; the manifest (reused from the store when already encoded)."""
    import ray
    import ray.data
    from safetensors.torch import save

    from g2p.models.vae import vae_version

    src = shards.read_manifest(prepared / group)
    if not src.get("image_size"):
        raise shards.ShardsError(f"{prepared / group}: has no images to encode")
    version = vae_version(vae)
    key = f"{version}-{src['content_key']}"
    loc = storage.join(storage_path, "latents", key, group) if shards.remote(storage_path) \
        else f"../_files/{group}"
    folder = out / group
    if shards.remote(storage_path):
        done = _read_marker(loc)
        if done is not None:  # the same VAE and images were encoded before: reuse
            folder.mkdir(parents=True, exist_ok=True)
            (folder / shards.MANIFEST).write_text(json.dumps(done, indent=2) + "\n")
            print(f"encode_latents: {group}: reusing {loc} (VAE {version})", flush=True)
            return {**done, "reused": True}
    fs, target = storage.filesystem(loc if shards.remote(storage_path) else storage.resolve(folder / loc))
    try:
        fs.delete_dir_contents(target, missing_dir_ok=True)
    except OSError as e:
        raise storage.StorageError(f"{loc}: storage unreachable ({e})") from None
    device = "cuda" if use_gpu else "cpu"
    dtype = "float16" if use_gpu else "float32"  # half the bytes on GPU clusters; exact on the CPU path
    weights = ray.put(save({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}))
    cpus = shards.cluster_cpus()
    pool = max(1, int(ray.cluster_resources().get("GPU", 0))) if use_gpu else max(1, cpus)
    ds = shards.ray_dataset(prepared / group, shards.META_COLUMNS + ["image"], shuffle=False)
    z = ds.map_batches(Encoder, batch_size=batch_size, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
                       num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                       fn_constructor_kwargs={"vae_config": dict(vae.config), "weights": weights,
                                              "image_size": src["image_size"], "device": device, "dtype": dtype})
    t0 = time.perf_counter()
    try:
        z.write_parquet(target, filesystem=fs, min_bytes_per_file=shards.TARGET_FILE_BYTES)
    except Exception as e:
        raise storage.StorageError(f"{loc}: writing the latents of {prepared / group} failed: {e}") from e
    dt = time.perf_counter() - t0
    with_shape = vae.config.latent_channels, src["image_size"] // _downsample(vae), src["image_size"] // _downsample(vae)
    m = shards.write_manifest(folder, loc, rows=src["rows"], group=group, content_key=src["content_key"],
                              source_image_size=src["image_size"],
                              latent={"shape": list(with_shape), "dtype": dtype,
                                      "scaling_factor": float(vae.config.scaling_factor), "vae_version": version})
    if shards.remote(storage_path):  # written last: the files are complete
        fs2, path = storage.filesystem(_marker(loc))
        with fs2.open_output_stream(path) as f:
            f.write(json.dumps(m).encode())
    print(f"encode_latents: {group}: {src['rows']} images in {dt:.1f} s ({src['rows'] / max(dt, 1e-9):.1f} images/s, "
          f"{pool} actors max, {device}, VAE {version})", flush=True)
    return {**m, "seconds": round(dt, 1)}


def _downsample(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_latents(model_dir: str | Path, prepared: str | Path, out: str | Path, *, storage_path: str = "outputs/ray",
                   use_gpu: bool = False, batch_size: int = 64, groups: tuple[str, ...] = GROUPS,
                   progress: bool = True, object_store_gb: float | None = None) -> dict[str, Any]:
    import shutil

    from g2p.model import G2PDiffusion
    from pipelines.ray_train import ensure_ray

    ensure_ray(object_store_gb=object_store_gb)
    shards.data_context(progress=progress, preserve_order=True)
    vae = G2PDiffusion.from_pretrained(model_dir).vae.eval()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    summary = {g: encode_group(Path(prepared), out, g, vae, storage_path=storage_path, use_gpu=use_gpu,
                               batch_size=batch_size) for g in groups}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipelines.ray_train import load_ray_section

    p = argparse.ArgumentParser(description="Prepared images -> VAE latents (Ray Data actors), once per VAE.")
    p.add_argument("--model", required=True, help="the model folder whose VAE encodes (models/train_vae)")
    p.add_argument("--prepared", default="outputs/prepared")
    p.add_argument("--out", default="outputs/latents")
    p.add_argument("--groups", nargs="+", default=list(GROUPS))
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    section = load_ray_section(a.params)
    summary = encode_latents(a.model, a.prepared, a.out, storage_path=section.storage_path, use_gpu=section.use_gpu,
                             batch_size=a.batch_size, groups=tuple(a.groups), progress=not a.quiet,
                             object_store_gb=section.object_store_gb)
    print(json.dumps({g: {"rows": m["rows"], "location": m["location"]} for g, m in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
