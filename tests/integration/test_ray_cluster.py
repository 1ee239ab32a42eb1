"""A real two-node Ray cluster (``ray start`` head + worker node, 1 CPU each, see tests/raycluster.py):
with ``RAY_ADDRESS`` set, ``ensure_ray()`` joins it and our code reaches the workers through the
``runtime_env`` (pipelines/ray_env.py), not from the checkout.

The driver (this process) runs from a temp cwd; the nodes run from their own temp dirs with no
PYTHONPATH. One cluster for the module: 3-5 min on this shared 2-core machine (load 9-25; start ~75-110 s).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.raycluster import RayCluster, ray_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def _under(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


@pytest.fixture(scope="module")
def driver(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """This process joined to the cluster by ``ensure_ray()`` (RAY_ADDRESS set, cwd a temp dir)."""
    import ray
    import ray.cloudpickle

    from pipelines.ray_train import ensure_ray

    if ray.is_initialized():  # a local Ray left by another module: ensure_ray() would keep it
        ray.shutdown()
    saved_env = {k: os.environ.get(k) for k in ray_cluster.env()}
    saved_cwd = os.getcwd()
    os.environ.update(ray_cluster.env())
    os.chdir(tmp_path_factory.mktemp("driver-cwd"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes cannot import tests/
    try:
        seconds = ensure_ray()
        yield seconds
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _nodes() -> tuple[str, str]:
    """(head node id, worker node id) of the alive nodes."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    head = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
    others = [n["NodeID"] for n in alive if "node:__internal_head__" not in n["Resources"]]
    assert len(head) == 1 and len(others) == 1, f"expected one head and one worker node alive, got {alive}"
    return head[0], others[0]


def test_ensure_ray_joins_the_cluster(ray_cluster: RayCluster, driver: float) -> None:  # noqa: F811
    import ray

    ctx = ray.get_runtime_context()
    assert ctx.gcs_address.endswith(f":{ray_cluster.gcs_port}"), \
        f"ensure_ray() joined {ctx.gcs_address}, not the test cluster at {ray_cluster.address}"
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2, f"the driver sees {len(alive)} alive nodes, expected 2: {alive}"
    assert ray.cluster_resources().get("CPU") == 2
    env = ctx.runtime_env
    mods = [str(m) for m in env.get("py_modules", [])]
    assert len(mods) == 2, f"job runtime_env has no py_modules for g2p and pipelines: {env}"


def test_worker_node_gets_our_code_from_the_runtime_env(ray_cluster: RayCluster, driver: float) -> None:  # noqa: F811
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _, worker = _nodes()

    @ray.remote(num_cpus=1)
    def where() -> dict:
        import g2p
        import pipelines
        import pipelines.ray_env

        return {"node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(),
                "g2p": g2p.__file__, "pipelines": pipelines.__file__,
                "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

    got = ray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False))
                  .remote(), timeout=120)
    assert got["node"] == worker, f"task ran on {got['node']}, not on the worker node {worker}"
    resources = ray_cluster.nodes[1].temp_dir.resolve()
    for pkg in ("g2p", "pipelines"):
        f = got[pkg]
        assert not _under(f, ROOT), f"{pkg} on the worker node came from the checkout: {f}"
        # not from an install in advance either (the venv has an editable install of /work/main):
        assert _under(f, resources) and "runtime_resources" in Path(f).parts, \
            f"{pkg} on the worker node is {f}, not from the runtime_env under {resources}/.../runtime_resources"
    assert not _under(got["cwd"], ROOT), f"the worker's cwd is in the checkout: {got['cwd']}"


def test_ray_data_runs_on_both_nodes(driver: float) -> None:
    import asyncio

    import ray

    head, worker = _nodes()

    @ray.remote(num_cpus=0)
    class Barrier:
        """``arrive`` returns once ``n`` callers have arrived (or raises after ``timeout_s``)."""

        def __init__(self, n: int) -> None:
            self.n, self.arrived, self.all_in = n, 0, asyncio.Event()

        async def arrive(self, timeout_s: float) -> int:
            self.arrived += 1
            if self.arrived >= self.n:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), timeout_s)
            return self.arrived

    barrier = Barrier.remote(2)

    def tag(batch: dict) -> dict:
        # both blocks in flight at once, so one per node (1 CPU each): a condition, not a 2 s sleep that a
        # loaded box can outlast
        ray.get(barrier.arrive.remote(300.0))
        n = len(batch["id"])
        return {"id": batch["id"], "node": [ray.get_runtime_context().get_node_id()] * n}

    rows = ray.data.range(2, override_num_blocks=2).map_batches(tag, batch_size=None, num_cpus=1).take_all()
    assert sorted(r["id"] for r in rows) == [0, 1]
    assert {r["node"] for r in rows} == {head, worker}, f"Ray Data ran its 2 blocks on {[r['node'] for r in rows]}"


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    import g2p

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model = ray.train.torch.prepare_model(torch.nn.Linear(2, 1))  # DDP over gloo across the two nodes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.full((4, 2), float(rank + 1))).pow(2).mean()
    loss.backward()
    opt.step()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    (Path(config["out"]) / f"rank{rank}.txt").write_text(
        f"{ray.get_runtime_context().get_node_id()} {g2p.__file__} {total.item()}")
    with tempfile.TemporaryDirectory() as d:  # Train V2 keeps the metrics of checkpointed reports only
        checkpoint = None
        if rank == 0:
            torch.save(model.state_dict(), Path(d) / "model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"rank_sum": float(total.item()), "loss": float(loss.item())}, checkpoint=checkpoint)


def test_torch_trainer_two_workers_one_per_node(driver: float, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    head, worker = _nodes()
    out = tmp_path / "ranks"
    out.mkdir()
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="cluster-smoke", storage_path=str(tmp_path / "ray_results")))
    result = trainer.fit()
    assert result.error is None, f"TorchTrainer failed: {result.error}"
    ranks = {p.name: p.read_text().split() for p in out.iterdir()}
    assert sorted(ranks) == ["rank0.txt", "rank1.txt"], f"train workers that wrote their rank file: {sorted(ranks)}"
    assert {node for node, _, _ in ranks.values()} == {head, worker}, f"train workers ran on {ranks}"
    assert all(float(s) == 3.0 for _, _, s in ranks.values()), f"all_reduce across the nodes: {ranks}"
    assert not any(_under(f, ROOT) for _, f, _ in ranks.values()), \
        f"train workers imported g2p from the checkout: {ranks}"
    assert result.metrics and result.metrics.get("rank_sum") == 3.0, f"reported metrics: {result.metrics}"
    assert result.checkpoint is not None, "no checkpoint registered in the local storage_path"
    assert _under(result.checkpoint.path, tmp_path / "ray_results"), result.checkpoint.path
    assert (Path(result.checkpoint.path) / "model.pt").is_file()
