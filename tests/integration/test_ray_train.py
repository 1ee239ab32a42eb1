"""Real local Ray (Train V2): the adapter runs the same stage functions on 1 and 2 workers,
synchronises gradients, survives a killed worker and resumes an interrupted run by name.

One Ray instance for the module (3 logical CPUs: two workers and Ray Data's readers); tiny
preset, a dozen steps per run. The streamed tests feed the stages from sharded Parquet
(``TorchTrainer(datasets=...)``), the others from an arrays file every worker loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from g2p.config import PIPELINE_SECTIONS, ConfigError, preset
from g2p.model import G2PDiffusion
from g2p.train import stages
from g2p.train.loop import Hooks
from pipelines.ray_train import RaySection, load_ray_section, ray_section, run_stage, save_arrays
from tests.fixtures import two_species_arrays

pytestmark = pytest.mark.integration

CFG = preset("tiny")
ROOT = Path(__file__).resolve().parents[2]


def _steps(stage: str, steps: int, log_every: int, checkpoint_every: int):
    return CFG.override({stage: {"steps": steps, "log_every": log_every, "checkpoint_every": checkpoint_every}})


# hooks built inside the workers: plain picklable classes (shipped by value, see the fixture)


class RankRecorder:
    """Each rank writes its shard, losses and a digest of its trained weights at the last step."""

    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps = out, steps

    def __call__(self, rank: int, world: int) -> Hooks:
        path = self.out / f"rank{rank}.jsonl"

        def write(row: dict) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({"rank": rank, "world": world, **row}) + "\n")

        def digest(step: int, state) -> None:
            if step == self.steps:
                flat = torch.cat([p.detach().flatten() for g in state.optimizer.param_groups for p in g["params"]])
                write({"step": step, "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest()})

        return Hooks(on_step=[lambda step, m: write({"step": step, "loss": m["loss"]})], on_checkpoint=[digest])


class KillAt:
    """SIGKILL this worker process at ``step`` on ``rank``, once (a marker file remembers)."""

    def __init__(self, rank: int, step: int, marker: Path) -> None:
        self.rank, self.step, self.marker = rank, step, marker

    def __call__(self, rank: int, world: int) -> Hooks:
        def maybe_die(step: int, _metrics: dict) -> None:
            if rank == self.rank and step == self.step and not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        return Hooks(on_step=[maybe_die])


@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.cloudpickle

    from pipelines import ray_train

    if ray.is_initialized():  # another module's Ray: start ours, with its object store size
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    # a taken dashboard port (here Ray's default, 8265) is Ray's to step past: the start goes on
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8265))
            taken.listen()
        except OSError:  # another process holds it already: the same situation
            pass
        # two training workers + one CPU for Ray Data's streaming readers; ray.object_store_gb's cap
        ray_train.ensure_ray(num_cpus=3, object_store_gb=OBJECT_STORE_GB)
        webui = ray._private.worker.global_worker.node.address_info["webui_url"]
        assert not webui.endswith(":8265"), webui
    yield
    ray.shutdown()


OBJECT_STORE_GB = 0.75


def test_local_ray_object_store_is_the_configured_size(ray_local) -> None:
    import ray

    assert ray.cluster_resources()["object_store_memory"] == pytest.approx(OBJECT_STORE_GB * 2**30, rel=0.01)
    # the controller polls its workers at ensure_ray's interval unless the user chose one
    from pipelines.ray_train import HEALTH_CHECK_INTERVAL_S

    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == HEALTH_CHECK_INTERVAL_S


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_arrays(two_species_arrays(), tmp_path_factory.mktemp("data") / "arrays.safetensors")


def _step_rows(log: list[dict]) -> list[int]:
    return [r["step"] for r in log if r["event"] == "step"]


# ----------------------------------------------------------------------------


def test_one_worker_is_the_plain_loop(ray_local, data_file: Path, tmp_path: Path) -> None:
    """1 worker: the loss goes down, the model loads, and it equals the in-process run of the same stage."""
    cfg = _steps("train_vae", 20, 2, 10)
    run = run_stage("train_vae", cfg, data=data_file, run_name="vae1", storage_path=tmp_path,
                    scaling=RaySection(num_workers=1))
    log = run.log()
    losses = [r["loss"] for r in log if r["event"] == "step"]
    assert _step_rows(log) == list(range(2, 21, 2))
    assert losses[-1] < losses[0]
    assert list(run.result.metrics_dataframe["step"]) == [10, 20]
    got = G2PDiffusion.from_pretrained(run.model_dir, cfg=cfg)
    assert got.cfg.vae.scaling_factor != 1.0  # the stage's finishing work is in the saved model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (cpus_per_worker=1): same summation order
    try:
        torch.manual_seed(cfg.train_vae.seed)
        ref = G2PDiffusion(cfg)
        stages.train_vae(ref, two_species_arrays(), cfg.train_vae, progress=False)
    finally:
        torch.set_num_threads(threads)
    for (k, a), b in zip(ref.vae.state_dict().items(), got.vae.state_dict().values()):
        assert torch.equal(a, b), k  # bit for bit: the adapter adds no numerics


def test_two_workers_shard_the_data_and_keep_weights_in_sync(ray_local, data_file: Path, tmp_path: Path) -> None:
    """DDP over conditioner + LoRA (gradient checkpointing on): same weights, different batches per rank."""
    steps = 12
    cfg = _steps("train_diffusion", steps, 2, 6)
    run = run_stage("train_diffusion", cfg, data=data_file, run_name="diff2", storage_path=tmp_path,
                    scaling=RaySection(num_workers=2, gradient_checkpointing=True),
                    hooks_factory=RankRecorder(tmp_path, steps))
    rows = {r: [json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert {row["world"] for r in rows for row in rows[r]} == {2}
    digests = [[x["digest"] for x in rows[r] if "digest" in x] for r in (0, 1)]
    assert digests[0] == digests[1] and len(digests[0]) == 1  # gradients were averaged: identical weights
    losses = [{x["step"]: x["loss"] for x in rows[r] if "loss" in x} for r in (0, 1)]
    assert losses[0].keys() == losses[1].keys() == set(range(2, steps + 1, 2))
    assert all(losses[0][s] != losses[1][s] for s in losses[0])  # each rank trained on its own shard

    # the result is a generator with LoRA that fits the data better than its start
    torch.manual_seed(cfg.train_diffusion.seed)
    before = G2PDiffusion(cfg)
    before.add_lora()
    after = G2PDiffusion.from_pretrained(run.model_dir, cfg=cfg)
    data = two_species_arrays()
    latents = stages.encode_latents(before, data.images)
    assert after.has_lora
    assert stages.eval_diffusion_loss(after, data, latents) < stages.eval_diffusion_loss(before, data, latents)


def test_killed_worker_restarts_from_checkpoint_and_logs_each_step_once(
        ray_local, data_file: Path, tmp_path: Path) -> None:
    cfg = _steps("pretrain_conditioner", 12, 1, 4)
    marker = tmp_path / "killed"
    run = run_stage("pretrain_conditioner", cfg, data=data_file, run_name="mlm", storage_path=tmp_path,
                    scaling=RaySection(num_workers=2, max_failures=2), hooks_factory=KillAt(1, 7, marker))
    assert marker.exists()  # rank 1 really died at step 7 of the first attempt
    log = run.log()
    starts = [(r["step"], r["attempt"]) for r in log if r["event"] == "start"]
    assert starts == [(0, 0), (4, 1)]  # the restart continued from the step-4 checkpoint, not from 0
    assert _step_rows(log) == list(range(1, 13))  # steps 5-7 ran twice but are logged once
    attempts = [r["attempt"] for r in log if r["event"] == "step"]
    # steps 1-4 (up to the checkpoint) are the first attempt's, 8-12 the second's; 5-7 are the first
    # attempt's if its rank 0 had flushed them before the kill (every LOG_FLUSH_S), else the second's
    assert attempts[:4] == [0] * 4 and attempts[7:] == [1] * 5 and attempts == sorted(attempts), attempts
    assert list(run.result.metrics_dataframe["step"]) == [4, 8, 12]
    G2PDiffusion.from_pretrained(run.model_dir, cfg=cfg)


def test_same_run_name_resumes_an_interrupted_stage(ray_local, data_file: Path, tmp_path: Path) -> None:
    import ray.train

    cfg = _steps("pretrain_conditioner", 8, 1, 4)
    marker = tmp_path / "killed"
    scaling = RaySection(num_workers=2, max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        run_stage("pretrain_conditioner", cfg, data=data_file, run_name="mlm", storage_path=tmp_path,
                  scaling=scaling, hooks_factory=KillAt(0, 6, marker))
    # a new trainer, same name and storage: picks the step-4 checkpoint up
    run = run_stage("pretrain_conditioner", cfg, data=data_file, run_name="mlm", storage_path=tmp_path,
                    scaling=scaling, hooks_factory=KillAt(0, 6, marker))
    log = run.log()
    assert [(r["step"], r["attempt"]) for r in log if r["event"] == "start"] == [(0, 0), (4, 1)]
    assert _step_rows(log) == list(range(1, 9))
    assert run.result.metrics["step"] == 8 and run.result.metrics["final"] == 1.0
    # once finished, the same name is a no-op that hands back the same model
    again = run_stage("pretrain_conditioner", cfg, data=data_file, run_name="mlm", storage_path=tmp_path,
                      scaling=scaling)
    assert again.model_dir == run.model_dir and again.log() == log


# ----------------------------------------------------------------------------
# the `ray` section (no Ray needed)
# ----------------------------------------------------------------------------


def test_ray_section_is_strict_and_read_from_params_yaml(tmp_path: Path) -> None:
    assert "ray" in PIPELINE_SECTIONS
    assert load_ray_section(ROOT / "params.yaml") == RaySection()
    assert ray_section({"num_workers": 4, "use_gpu": True}).num_workers == 4
    with pytest.raises(ConfigError, match=r"ray\.bogus"):
        ray_section({"bogus": 1})
    with pytest.raises(ConfigError, match=r"ray\.num_workers"):
        ray_section({"num_workers": "2"})
    with pytest.raises(ConfigError, match=r"ray\.num_workers"):
        ray_section({"num_workers": 0})
    with pytest.raises(ConfigError, match=r"ray\.object_store_gb.*0\.01"):
        ray_section({"object_store_gb": 0.01})
    assert ray_section({"object_store_gb": 2}).object_store_gb == 2
    p = tmp_path / "params.yaml"
    p.write_text("ray:\n  max_failures: 5\n  bf16: false\n")
    assert load_ray_section(p) == RaySection(max_failures=5, bf16=False)


# ----------------------------------------------------------------------------
# streamed: Ray Data shards into Ray Train
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two-species records as a sharded dataset, and their latents (tiny model's VAE) as another."""
    from g2p.models.vae import vae_version
    from pipelines import shards

    root = tmp_path_factory.mktemp("shards")
    data = two_species_arrays()
    torch.manual_seed(CFG.train_base.seed)
    model = G2PDiffusion(CFG)
    model.save_pretrained(root / "model")
    latents = stages.encode_latents(model, data.images)
    shards.write_arrays(data, root / "train")
    shards.write_arrays(data, root / "latents", latents=latents, vae_version=vae_version(model.vae),
                        scaling_factor=float(model.vae.config.scaling_factor))
    return {"train": root / "train", "latents": root / "latents", "model": root / "model"}


def test_streamed_stage_reads_its_ray_data_shard(ray_local, shard_data: dict[str, Path], tmp_path: Path) -> None:
    """Two workers stream the latents (no worker encodes images); each rank sees its own rows; weights stay equal."""
    steps = 8
    cfg = _steps("train_diffusion", steps, 2, 4)
    run = run_stage("train_diffusion", cfg, data=shard_data["latents"], init_model=shard_data["model"],
                    run_name="stream2", storage_path=tmp_path, scaling=RaySection(num_workers=2),
                    hooks_factory=RankRecorder(tmp_path, steps))
    log = run.log()
    assert [r.get("streamed") for r in log if r["event"] == "start"] == [True]
    assert _step_rows(log) == list(range(2, steps + 1, 2))
    rows = {r: [json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    digests = [[x["digest"] for x in rows[r] if "digest" in x] for r in (0, 1)]
    assert digests[0] == digests[1] and len(digests[0]) == 1
    losses = [{x["step"]: x["loss"] for x in rows[r] if "loss" in x} for r in (0, 1)]
    assert all(losses[0][s] != losses[1][s] for s in losses[0])  # each rank trained on its own split
    assert G2PDiffusion.from_pretrained(run.model_dir, cfg=cfg).has_lora


def test_streamed_latents_of_another_vae_are_refused(shard_data: dict[str, Path]) -> None:
    from pipelines import shards
    from pipelines.stream import check_latents as _check_latents

    m = shards.read_manifest(shard_data["latents"])
    model = G2PDiffusion.from_pretrained(shard_data["model"])
    _check_latents(model, m)  # the VAE that encoded them: accepted
    model.set_vae_scaling_factor(0.5)  # another VAE (its scale is part of it)
    with pytest.raises(shards.ShardsError, match=r"latent.vae_version: the latents were encoded with VAE "):
        _check_latents(model, m)


def test_streaming_needs_a_cpu_besides_the_workers(ray_local, shard_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ray.num_workers: 3 workers x 1 CPUs hold all 3 CPUs"):
        run_stage("pretrain_conditioner", _steps("pretrain_conditioner", 2, 1, 2), data=shard_data["train"],
                  run_name="nocpu", storage_path=tmp_path, scaling=RaySection(num_workers=3))


def test_latents_stage_encodes_like_the_model(ray_local, shard_data: dict[str, Path], tmp_path: Path) -> None:
    """pipelines.latents (Ray Data actors) gives the latents stages.encode_latents gives, keyed by the VAE."""
    from g2p.models.vae import vae_version
    from pipelines import latents, shards

    prepared = tmp_path / "prepared"
    shards.write_arrays(two_species_arrays(), prepared / "train", content_key="k")
    latents.encode_latents(shard_data["model"], prepared, tmp_path / "latents", storage_path=str(tmp_path / "ray"),
                           batch_size=5, progress=False)
    m = shards.read_manifest(tmp_path / "latents" / "train")
    model = G2PDiffusion.from_pretrained(shard_data["model"])
    assert m["latent"]["vae_version"] == vae_version(model.vae) and m["rows"] == 16
    got = shards.read_arrays_latents(tmp_path / "latents" / "train")
    data = two_species_arrays()
    want = dict(zip(data.processid, stages.encode_latents(model, data.images)))
    assert set(got) == set(want)
    for pid, z in got.items():
        torch.testing.assert_close(z, want[pid], rtol=1e-5, atol=1e-5)
