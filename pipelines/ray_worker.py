"""Inside each Ray Train worker: the train function :func:`ray_train.run_stage` hands to ``TorchTrainer``.

:func:`worker_loop` builds or resumes the model, takes its data shard, and runs
the same stage function the unit tests call, through the three seams the
module docstring of :mod:`pipelines.ray_train` describes: ``wrap``
(``_wrap_for``: DDP, bf16 autocast on GPU), ``hooks`` (``_RayHooks``:
the step log, the user's hooks, throttled reports, checkpoints) and ``resume``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from g2p.config import G2PConfig, TrainConfig
from g2p.train.loop import FitState, Hooks
from pipelines import stream
from pipelines.ray_train import LOG_FLUSH_S, RaySection, load_data, read_log, write_log

class _Autocast(nn.Module):
    """bf16 autocast around a (DDP-wrapped) objective; the loop's backward runs outside it."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner, self.device_type = inner, device_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


def _wrap_for(stage: str, section: RaySection, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    from ray.train.torch import prepare_model

    # The conditioner's MLM head gets no gradient in train_diffusion, nor does
    # anything when an MLM batch masks no token; DDP must then look for unused
    # parameters (an extra autograd-graph walk per step, so only there).
    find_unused = stage in ("pretrain_conditioner", "train_diffusion")

    def wrap(objective: nn.Module) -> nn.Module:
        out = prepare_model(objective, move_to_device=False,
                            parallel_strategy_kwargs={"find_unused_parameters": find_unused})
        return _Autocast(out, device.type) if section.bf16 and device.type == "cuda" else out

    return wrap


def _enable_gradient_checkpointing(model: nn.Module, stage: str) -> None:
    if stage in ("train_base", "train_diffusion"):
        model.denoiser.unet.enable_gradient_checkpointing()
    if stage == "train_vae":
        model.vae.enable_gradient_checkpointing()
    if stage in ("pretrain_conditioner", "train_diffusion"):
        model.conditioner.bert.activation_checkpointing_enable({"use_reentrant": False})


class _RayHooks:
    """The loop's hooks in a worker: reports, checkpoints and the deduplicated step log."""

    def __init__(self, stage: str, model: nn.Module, tcfg: TrainConfig, log_path: str, user: Hooks,
                 report_interval_s: float, device: torch.device) -> None:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.stage, self.model, self.tcfg, self.log_path, self.user = stage, model, tcfg, log_path, user
        self.last: tuple[int, dict[str, float]] = (-1, {})
        self.report_interval_s, self.device, self.last_report = report_interval_s, device, float("-inf")
        seen = {"logged_until": -1, "attempt": 0}
        self.rows: list[dict[str, Any]] = []  # rank 0: the whole log, rewritten to storage (no append there)
        self.last_flush = time.monotonic()
        if self.rank == 0:
            rows = self.rows = read_log(log_path)
            steps = [r["step"] for r in rows if r.get("event") == "step"]
            seen = {"logged_until": max(steps, default=-1), "attempt": sum(r.get("event") == "start" for r in rows)}
        seen = broadcast_from_rank_zero(seen)  # every rank must agree on which steps it reports
        self.logged_until, self.attempt = seen["logged_until"], seen["attempt"]

    def hooks(self) -> Hooks:
        return Hooks(on_step=[self.on_step], on_checkpoint=[self.on_checkpoint, *self.user.on_checkpoint],
                     on_eval=list(self.user.on_eval))

    def log(self, row: dict[str, Any], flush: bool = False) -> None:
        """One row of the step log (rank 0); written out every few seconds, at checkpoints and at the end.

        Rows not yet written when a worker dies belong to steps after the last
        checkpoint, which the restart trains (and logs) again.
        """
        if self.rank == 0:
            self.rows.append({**row, "attempt": self.attempt})
            if flush or time.monotonic() - self.last_flush >= LOG_FLUSH_S:
                self.flush()

    def flush(self) -> None:
        if self.rank == 0:
            write_log(self.log_path, self.rows)
            self.last_flush = time.monotonic()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        if step <= self.logged_until:  # trained again after a restart; logged the first time
            return
        metrics = {**metrics, "global_samples_per_s": metrics.get("samples_per_s", 0.0) * self.world}
        self.log({"event": "step", "step": step, **metrics})
        self.last = (step, metrics)
        if self.report_due():
            ray.train.report({"step": step, **metrics})
        for h in self.user.on_step:
            h(step, metrics)

    def report_due(self) -> bool:
        """Rank 0's clock decides; a broadcast makes every rank agree (report is a barrier)."""
        now = time.monotonic()
        due = torch.tensor([int(now - self.last_report >= self.report_interval_s)], dtype=torch.uint8,
                           device=self.device)
        if self.world > 1:
            torch.distributed.broadcast(due, src=0)
        if bool(due):
            self.last_report = now
        return bool(due)

    def on_checkpoint(self, step: int, state: FitState) -> None:
        if step < self.tcfg.steps:  # the last one is saved after the stage's own finishing work
            self.save(state, final=False)

    def save(self, state: FitState, *, final: bool) -> None:
        import ray.train
        from ray.train import Checkpoint

        from g2p.train.checkpoint import save_tree

        metrics = {**(self.last[1] if self.last[0] == state.step else {}), "step": state.step, "final": float(final)}
        self.flush()
        with tempfile.TemporaryDirectory() as d:
            if self.rank == 0:  # DDP keeps every rank's weights equal: one writer
                self.model.save_pretrained(Path(d) / "model")
                save_tree(Path(d) / "train_state.safetensors", state.state_dict(), self.model.cfg, self.stage)
                (Path(d) / "progress.json").write_text(json.dumps({"stage": self.stage, "step": state.step,
                                                                   "final": final}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if self.rank == 0 else None)
        # A report is only registered when the controller next polls; a crash
        # before that would lose the checkpoint. Wait until it is, so every
        # checkpoint the loop has passed is one a restart resumes from.
        ray.train.get_all_reported_checkpoints()


def _quiet_reports() -> None:
    """Train V2 logs one INFO line per report on a logger named by its file, outside ``ray.train``."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _load_model(location: str, cfg: G2PConfig, device: torch.device) -> Any:
    """A ``save_pretrained`` folder from a local path or a storage URI (downloaded to a temp dir)."""
    from g2p.model import G2PDiffusion
    from pipelines import storage as st

    if not st.is_uri(location):
        return G2PDiffusion.from_pretrained(location, cfg=cfg, device=device)
    with tempfile.TemporaryDirectory() as d:
        return G2PDiffusion.from_pretrained(st.download(location, Path(d) / "model"), cfg=cfg, device=device)


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker train function: build or resume, train the stage, save the result."""
    import ray.train
    import ray.train.torch

    from g2p.model import G2PDiffusion
    from g2p.train import stages
    from g2p.train.checkpoint import load_tree

    stage, section = config["stage"], RaySection(**config["ray"])
    cfg = G2PConfig.from_json(config["cfg"])
    tcfg: TrainConfig = getattr(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if section.use_gpu else torch.device("cpu")
    torch.set_num_threads(section.cpus_per_worker)
    _quiet_reports()

    # 1. the model: a checkpoint of this run, else the input folder, else fresh (same seed on every rank)
    torch.manual_seed(tcfg.seed)
    resume, ckpt = None, ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if json.loads((Path(d) / "progress.json").read_text())["final"]:
                return  # this run already finished: nothing to train, nothing to report
            model = G2PDiffusion.from_pretrained(Path(d) / "model", cfg=cfg, device=device)
            resume = load_tree(Path(d) / "train_state.safetensors")
    elif config["init_model"]:
        model = _load_model(config["init_model"], cfg, device)
    else:
        model = G2PDiffusion(cfg).to(device)
    torch.manual_seed(tcfg.seed + rank)  # anything drawn from the global RNG differs per rank
    if section.gradient_checkpointing:
        _enable_gradient_checkpointing(model, stage)

    # 2. data: this worker's Ray Data shard (streamed), or every worker loads the same small file
    manifest, latents = config["manifest"], None
    if manifest is not None:
        data: Any = stream.streamed_batches(stage, manifest, tcfg, rank, world, int(resume["step"]) if resume else 0)
    else:
        needs_images = stage != "pretrain_conditioner"
        data = load_data(config["data"], config["splits"], cfg.vae.image_size if needs_images else None)
        if stage in stream.LATENT_STAGES:
            latents = stages.encode_latents(model, data.images)  # (N, C, h, w), deterministic
    factory = config["hooks_factory"]
    user = factory(rank, world) if factory else Hooks()
    ray_hooks = _RayHooks(stage, model, tcfg, config["log_path"], user, section.report_interval_s, device)
    ray_hooks.log({"event": "start", "step": int(resume["step"]) if resume else 0, "world_size": world,
                   "streamed": manifest is not None}, flush=True)

    # 3. the same stage function the unit tests call
    kw = dict(shard=stages.Shard(rank, world), hooks=ray_hooks.hooks(), resume=resume, progress=False,
              wrap=_wrap_for(stage, section, device))
    if stage == "pretrain_conditioner":
        state = stages.pretrain_conditioner(model, data, tcfg, **kw)
    elif stage == "train_vae":
        state = stages.train_vae(model, data, tcfg, **kw)
    elif stage == "train_base":
        state = stages.train_base(model, data, tcfg, latents=latents, **kw)
    elif stage == "train_diffusion":
        state = stages.train_diffusion(model, data, tcfg, latents=latents, **kw)
    else:
        # the bank size of the params at hand, not of the checkpoint's cfg (set at the first stage)
        state = stages.train_aligner(model, data, tcfg, latents=latents, bank_size=cfg.sampling.negative_bank_size,
                                     **kw)
    ray_hooks.save(state, final=True)


