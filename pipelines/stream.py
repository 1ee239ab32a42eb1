"""Ray Data into Ray Train: which columns a stage streams, its dataset, and each worker's batches.

The driver side (:func:`stage_input`) turns a sharded dataset folder
(:mod:`pipelines.shards`) into the ``datasets`` of a ``TorchTrainer``; the
worker side (:func:`streamed_batches`) iterates its
``ray.train.get_dataset_shard`` as the endless batch stream the stage
functions of :mod:`g2p.train.stages` take. :func:`check_latents` refuses
latents of another VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from g2p.config import ConfigError, G2PConfig, TrainConfig

if TYPE_CHECKING:
    from pipelines.ray_train import RaySection


# Which columns of a sharded dataset each stage reads (the MLM never reads image bytes).
STAGE_COLUMNS = {
    "pretrain_conditioner": ["barcode", "lat", "lon", "has_place"],
    "train_vae": ["image"],
    "train_base": ["latent"],
    "train_diffusion": ["barcode", "lat", "lon", "has_place", "latent"],
    "train_aligner": ["barcode", "lat", "lon", "has_place", "latent"],
}
LATENT_STAGES = ("train_base", "train_diffusion", "train_aligner")


def tail_rows(stage: str, cfg: G2PConfig) -> int:
    """Rows each rank takes from the stream after its steps: the latent-scale sample, the negative bank."""
    from g2p.train.stages import VAE_SCALE_SAMPLE

    if stage == "train_vae":
        return VAE_SCALE_SAMPLE
    if stage == "train_aligner":
        return max(0, cfg.sampling.negative_bank_size)
    return 0


def stage_input(stage: str, data: str | Path, scaling: RaySection, cfg: G2PConfig) -> tuple[dict[str, Any], Any]:
    """(the worker's view of ``data``, the Ray datasets to stream) for a sharded dataset, else in-memory.

    A pass over a Ray dataset costs a second or more to start (the split
    coordinator, the read tasks), which a small data set of a few steps per
    epoch would pay at every epoch. So a small one (up to
    ``shards.SMALL_BYTES``) is read once and one *pass* holds ``repeats``
    references to it, enough rows for the whole stage (capped at 64); a large
    one (BIOSCAN size) streams one epoch a pass. Block order is randomised
    over the whole pass, and every pass again. The rows a stage takes after
    its steps (:func:`tail_rows`) count too.
    """
    from pipelines import shards

    tcfg: TrainConfig = getattr(cfg, stage)
    if not shards.is_shards(data):
        return {"data": str(Path(data).resolve()), "manifest": None}, None
    m = shards.read_manifest(data)
    if stage in LATENT_STAGES and not m.get("latent"):
        raise shards.ShardsError(f"{data}: {stage} trains on latents; this dataset has none "
                                 "(encode it with python -m pipelines.latents)")
    if stage == "train_vae" and not m.get("image_size"):
        raise shards.ShardsError(f"{data}: train_vae trains on images; this dataset has none")
    cpus = shards.cluster_cpus()
    if cpus - scaling.num_workers * scaling.cpus_per_worker < 1:  # else Ray Data's readers wait forever
        raise ConfigError(f"ray.num_workers: {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs hold "
                          f"all {cpus} CPUs of the cluster; streaming the data needs at least one CPU besides them")
    shards.data_context()  # no bars: the step log shows progress
    need = tcfg.steps * tcfg.batch_size + tail_rows(stage, cfg) * scaling.num_workers
    repeats = int(min(64, max(1, -(-need // max(1, m["rows"])))))
    per_row = shards.row_bytes(m.get("image_size") if stage == "train_vae" else None,
                               (m.get("latent") or {}).get("shape") if stage in LATENT_STAGES else None)
    if m["rows"] * per_row > shards.SMALL_BYTES:
        repeats = 1  # a large data set streams one epoch a pass (see shards.ray_dataset)
    ds = shards.ray_dataset(data, STAGE_COLUMNS[stage], repeats=repeats)
    return {"data": None, "manifest": {**m, "rows": m["rows"] * repeats, "repeats": repeats}}, {"train": ds}


def streamed_batches(stage: str, manifest: dict[str, Any], tcfg: TrainConfig, rank: int, world: int,
                      start_step: int) -> Any:
    """Endless training batches from this worker's Ray Data shard, reshuffled every epoch.

    Block order is randomised by the dataset at each epoch; rows are mixed
    within a local buffer (seeded by seed, rank, epoch and the resume step).

    A small data set's pass already holds the rows the stage takes after its
    steps (:func:`stage_input`), so the stream does not start a new pass for them.
    """
    from functools import partial

    import ray.train

    from g2p.train.stages import Shard, per_rank_batch_size
    from pipelines import shards

    shard = ray.train.get_dataset_shard("train")
    per_rank = per_rank_batch_size(tcfg, Shard(rank, world))
    rows_per_rank = manifest["rows"] // world
    latent = manifest.get("latent") if stage in LATENT_STAGES else None
    per_row = shards.row_bytes(manifest.get("image_size") if stage == "train_vae" else None,
                               latent["shape"] if latent else None)
    buffer = max(per_rank, min(rows_per_rank, 4 * per_rank + 1000, (256 << 20) // per_row))
    drop_last = rows_per_rank >= per_rank  # fewer rows than one batch: one smaller batch per epoch
    collate = partial(shards.collate, manifest=manifest)
    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=per_rank, drop_last=drop_last, collate_fn=collate,
                                              local_shuffle_buffer_size=buffer,
                                              local_shuffle_seed=(tcfg.seed * 1_000_003 + start_step) * 1009
                                              + epoch * 31 + rank):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"{stage}: worker {rank} got no batch in epoch {epoch} "
                             f"({manifest['rows']} rows over {world} workers)")
        epoch += 1


def check_latents(model: Any, manifest: dict[str, Any]) -> None:
    from g2p.models.vae import vae_version
    from pipelines.shards import ShardsError

    want, have = manifest["latent"]["vae_version"], vae_version(model.vae)
    if want != have:
        raise ShardsError(f"latent.vae_version: the latents were encoded with VAE {want}, the model's VAE is "
                          f"{have}; re-encode them (python -m pipelines.latents) with this model's VAE")
