"""``fit``: the one training loop every stage, test, Ray worker and GPU run shares.

The loop knows nothing of Ray or MLflow. They come in as :class:`Hooks`:
``on_step`` (metrics every ``log_every`` steps), ``on_checkpoint`` (every
``checkpoint_every`` steps and at the end) and ``on_eval``. A stage supplies a
``step_fn(batch, step) -> dict`` that returns at least ``loss`` (a tensor);
``fit`` owns backward, clipping, the optimiser, the learning-rate schedule,
EMA and progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from g2p.config import TrainConfig

StepFn = Callable[[Any, int], dict[str, Any]]
Hook = Callable[..., None]


@dataclass
class Hooks:
    """Callbacks the loop calls; each list may hold any number of callables.

    - ``on_step(step, metrics)``: every ``log_every`` steps and at the last step.
    - ``on_checkpoint(step, state)``: every ``checkpoint_every`` steps and at the end;
      ``state`` is a :class:`FitState` (its ``state_dict()`` resumes the loop).
    - ``on_eval(step)``: with ``on_checkpoint``.
    """

    on_step: list[Hook] = field(default_factory=list)
    on_checkpoint: list[Hook] = field(default_factory=list)
    on_eval: list[Hook] = field(default_factory=list)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` (or constant), as a multiplier."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant" or cfg.steps <= cfg.warmup_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of parameters (kept in float32 on the params' device)."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"ema.{i}"])


@dataclass
class FitState:
    """What resuming needs: step, optimiser, schedule and EMA state."""

    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
        }


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def cycle(make_batches: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    """Endless batches; ``make_batches(epoch)`` gives one epoch (reshuffled per epoch)."""
    epoch = 0
    while True:
        empty = True
        for b in make_batches(epoch):
            empty = False
            yield b
        if empty:
            raise ValueError("make_batches: an epoch yielded no batch (empty dataset?)")
        epoch += 1


def fit(
    step_fn: StepFn,
    params: list[nn.Parameter],
    batches: Iterator[Any],
    cfg: TrainConfig,
    *,
    hooks: Hooks | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    until: int | None = None,
) -> FitState:
    """Run ``cfg.steps`` optimisation steps of ``step_fn`` over ``batches``.

    ``resume`` is a ``FitState.state_dict()`` from a checkpoint: the loop then
    continues at its step with the same optimiser, schedule and EMA, so an
    interrupted stage finishes where it would have. ``until`` stops early (at
    that step) without changing the schedule, which is always over ``cfg.steps``.
    """
    hooks = hooks or Hooks()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit: no trainable parameters")
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = FitState(step=0, optimizer=opt, scheduler=sched, ema=ema)
    if resume:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        state.step = int(resume["step"])

    end = cfg.steps if until is None else min(until, cfg.steps)
    bar = _progress(cfg.steps, state.step, desc) if progress else None
    t0, n_seen, last_log = time.perf_counter(), 0, time.perf_counter()
    while state.step < end:
        batch = next(batches)
        out = step_fn(batch, state.step)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {state.step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        state.step += 1
        n_seen += int(out.get("batch_size", 0))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = state.step == cfg.steps
        if state.step % cfg.log_every == 0 or last:
            now = time.perf_counter()
            metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                       for k, v in out.items() if k != "batch_size"}
            metrics["lr"] = sched.get_last_lr()[0]
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["samples_per_s"] = n_seen / max(1e-9, now - last_log)
            metrics["elapsed_s"] = now - t0
            n_seen, last_log = 0, now
            for h in hooks.on_step:
                h(state.step, metrics)
        if state.step % cfg.checkpoint_every == 0 or last:
            for h in hooks.on_eval:
                h(state.step)
            for h in hooks.on_checkpoint:
                h(state.step, state)
    if bar is not None:
        bar.close()
    return state


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", mininterval=2.0,
                dynamic_ncols=True)
