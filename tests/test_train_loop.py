"""The shared training loop: schedule, EMA, hooks, resumption, safetensors state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from g2p.config import G2PConfig, TrainConfig
from g2p.train.checkpoint import (
    ArchitectureMismatch, check_architecture, config_from_checkpoint, load_module, load_tree,
    save_module, save_tree,
)
from g2p.train.loop import Hooks, cycle, fit, lr_lambda


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)

    def batches(epoch: int):
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 64, 16):
            idx = perm[i:i + 16]
            yield x[idx], y[idx]

    def step_fn(batch, step):
        xb, yb = batch
        return {"loss": ((model(xb).squeeze(-1) - yb) ** 2).mean(), "batch_size": len(xb)}

    return model, batches, step_fn


def test_cosine_schedule_warms_up_and_decays() -> None:
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)


def test_fit_lowers_the_loss_and_calls_hooks() -> None:
    model, batches, step_fn = _problem()
    logged, ckpts = [], []
    cfg = TrainConfig(steps=60, lr=2e-1, warmup_steps=5, log_every=20, checkpoint_every=30, ema_decay=0.9)
    hooks = Hooks(on_step=[lambda s, m: logged.append((s, m))], on_checkpoint=[lambda s, st: ckpts.append(s)])
    fit(step_fn, list(model.parameters()), cycle(batches), cfg, hooks=hooks, progress=False)
    assert [s for s, _ in logged] == [20, 40, 60]
    assert ckpts == [30, 60]
    assert logged[-1][1]["loss"] < 0.2 * logged[0][1]["loss"]
    assert {"lr", "grad_norm", "samples_per_s"} <= set(logged[0][1])


def test_resume_from_saved_state_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=40, lr=5e-2, warmup_steps=5, log_every=10, checkpoint_every=20, ema_decay=0.9)
    model, batches, step_fn = _problem()
    fit(step_fn, list(model.parameters()), cycle(batches), cfg, progress=False)
    straight = [p.detach().clone() for p in model.parameters()]

    # Interrupted after 20 steps, state saved as safetensors, resumed in a new process-like setup.
    model, batches, step_fn = _problem()
    state = fit(step_fn, list(model.parameters()), cycle(batches), cfg, progress=False, until=20)
    assert state.step == 20
    save_tree(tmp_path / "state.safetensors", state.state_dict())
    save_module(tmp_path / "model.safetensors", model, G2PConfig(), "toy")
    model2, _, _ = _problem()
    load_module(tmp_path / "model.safetensors", model2)

    def step_fn2(batch, step):
        xb, yb = batch
        return {"loss": ((model2(xb).squeeze(-1) - yb) ** 2).mean(), "batch_size": len(xb)}

    it = cycle(batches)
    for _ in range(20):  # the data stream continues where it was
        next(it)
    resumed = fit(step_fn2, list(model2.parameters()), it, cfg,
                  resume=load_tree(tmp_path / "state.safetensors"), progress=False)
    assert resumed.step == 40
    for a, b in zip(straight, model2.parameters()):
        torch.testing.assert_close(a, b.detach())


def test_checkpoint_carries_config_and_refuses_other_architectures(tmp_path: Path) -> None:
    cfg = G2PConfig()
    save_module(tmp_path / "m.safetensors", nn.Linear(2, 3), cfg, "toy")
    assert config_from_checkpoint(tmp_path / "m.safetensors") == cfg
    other = cfg.set("unet.block_out_channels", [16, 32, 32])
    with pytest.raises(ArchitectureMismatch, match=r"unet\.block_out_channels"):
        check_architecture(cfg, other, ("unet",))
    with pytest.raises(ArchitectureMismatch, match="shape"):
        load_module(tmp_path / "m.safetensors", nn.Linear(2, 4))


def test_nonfinite_loss_is_an_error() -> None:
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(FloatingPointError, match="step 0"):
        fit(lambda b, s: {"loss": p * float("nan")}, [p], iter(range(10)), TrainConfig(steps=3), progress=False)
