"""The tiny pipeline on a real two-node Ray cluster with everything remote: SeaweedFS S3, MLflow over HTTP.

- ``ray start`` head + worker node (tests/raycluster.py, 2 logical CPUs each: two training workers
  plus Ray Data's readers), their cwd outside the checkout; every command below is a separate
  driver process (``python -m pipelines.…``) with ``RAY_ADDRESS`` set, its cwd a temp dir.
- ``ray.storage_path`` is ``s3://`` on a SeaweedFS store (tests/s3store.py): prepared shards,
  latents, init models, checkpoints and step logs live there. The data root is uploaded to the
  bucket and the local copy deleted before ``prepare --root s3://…``, so nothing can read it from disk.
- ``mlflow server`` over HTTP, artifacts in the same bucket; ``pipelines.stage`` logs to it
  (from the driver and from rank 0 inside the cluster).

Then, on the same cluster and data: a training worker SIGKILLed mid-stage (Ray Train restarts the
group from the last checkpoint), and the S3 store stopped mid-stage (the stage fails naming the
storage URI; after a restart of the store a rerun resumes from the last checkpoint).

Runtime on this 2-core machine, idle (`make test-cluster`, 2026-12-04): all three tests pass in
11 min 35 s. Services (S3, MLflow, cluster) 19 s; per command: prepare 37 s, pretrain_conditioner 38 s,
train_vae 67 s, encode_latents 47 s, train_base 42 s, train_diffusion 48 s, train_aligner 65 s (with its
sample grid); the killed worker 93 s; the S3 outage 89 s and the rerun 101 s. Nearly all of it is
process start-up (each driver joins the cluster, each Ray Data / Train actor imports torch), not the
4 steps per stage; under a load of 12-90 (2026-12-02) the pipeline test alone took ~25 min.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.raycluster import RayCluster
from tests.s3store import S3Store, free_ports
from serving.testing import wait_http
from tests.servers import restore_environ

# Not in `make test`'s 20-minute budget: `make test-cluster` runs it (about 12 minutes on an idle 2-core box).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]  # the checkout
STAGE_STEPS = 4  # per stage in the pipeline test
# train_base steps of the failure tests (checkpoint every 5): enough that the stage is still running when
# the worker is killed / the store stopped (a step takes ~0.3-1 s here, noticing a step in the log a few s)
KILL_STEPS, OUTAGE_STEPS = 100, 150
TIMINGS: dict[str, float] = {}


class Services:
    def __init__(self, s3: S3Store, cluster: RayCluster, mlflow_url: str, work: Path) -> None:
        self.s3, self.cluster, self.mlflow_url, self.work = s3, cluster, mlflow_url, work

    @property
    def storage(self) -> str:
        return self.s3.uri("ray")

    def env(self) -> dict[str, str]:
        """A driver's environment: the cluster, S3 credentials, MLflow; our code from this checkout."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RAY_", "MLFLOW_", "AWS_"))}
        return {**env, **self.s3.env(), **self.cluster.env(), "MLFLOW_TRACKING_URI": self.mlflow_url,
                "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "G2P_MLFLOW_EXPERIMENT": "cluster-pipeline"}


def _start_cluster(work: Path) -> RayCluster:
    """Ray's fixed 30 s raylet registration deadline is sometimes missed by the *head* under load
    (the fixture retries worker nodes only): a fresh cluster then."""
    last: Exception | None = None
    for attempt in range(3):
        try:
            return RayCluster(work / f"raycluster{attempt}", cpus_per_node=2, start_timeout=240).start()
        except Exception as e:  # noqa: BLE001 - start() already stopped what it started
            last = e
    raise RuntimeError(f"the test Ray cluster did not start in 3 attempts: {last}")


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("clusterpipe")
    t0 = time.perf_counter()
    s3 = S3Store(work / "s3").start()
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    ml_log = open(work / "mlflow.log", "wb")
    # the server's background job runner (huey consumers) is of no use here: off, it saves CPU
    ml = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                           "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                           "--artifacts-destination", f"s3://{s3.bucket}/mlflow", "--workers", "1"],
                          env={**os.environ, **s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                          stdout=ml_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    cluster = None
    saved = {k: os.environ.get(k) for k in s3.env()}
    try:
        cluster = _start_cluster(work)
        wait_http(f"{url}/health", timeout=300, proc=ml, log=work / "mlflow.log")  # a loaded box: slow
        TIMINGS["services"] = time.perf_counter() - t0
        print(f"[cluster-pipeline] services: {TIMINGS['services']:.0f} s", file=sys.stderr, flush=True)
        os.environ.update(s3.env())  # this process reads the step logs from S3 (pyarrow: AWS_* variables)
        yield Services(s3, cluster, url, work)
    finally:
        restore_environ(saved)
        _stop(ml)
        ml_log.close()
        if cluster is not None:
            cluster.stop()
        s3.stop()
        print("timings (s):", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}), file=sys.stderr)


def _cmd(svc: Services, *args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _run(svc: Services, name: str, *args: str, timeout: float = 900) -> str:
    """One pipeline command as its own driver process (cwd outside the checkout); its stdout."""
    cwd = svc.work / "driver"
    cwd.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run(_cmd(svc, *args), cwd=cwd, env=svc.env(), capture_output=True, text=True,
                         timeout=timeout)
    TIMINGS[name] = time.perf_counter() - t0
    print(f"[cluster-pipeline] {name}: {TIMINGS[name]:.0f} s (rc {out.returncode})", file=sys.stderr, flush=True)
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out.stdout


def _params(svc: Services, path: Path, steps: int, checkpoint_every: int, **ray: object) -> Path:
    """The tiny preset, ``steps`` per stage, storage on S3."""
    p = yaml.safe_load((svc.work / "tiny.yaml").read_text())
    for st in ("pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner"):
        p[st].update(steps=steps, log_every=1, checkpoint_every=checkpoint_every, warmup_steps=1)
    p["ray"].update(storage_path=svc.storage, num_workers=2, cpus_per_worker=1, **ray)
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def _s3_keys(svc: Services, prefix: str) -> list[str]:
    c, keys, token = svc.s3.client(), [], None
    while True:
        kw = {"Bucket": svc.s3.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        r = c.list_objects_v2(**kw)
        keys += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return keys
        token = r["NextContinuationToken"]


@pytest.fixture(scope="module")
def pipeline(services: Services):
    """prepare -> pretrain_conditioner -> train_vae -> encode latents -> train_base -> train_diffusion ->
    train_aligner, every command a driver on the cluster; the folders on the driver's side."""
    svc, w = services, services.work
    g2p = [sys.executable, "-m", "pipelines.cli"]
    env = svc.env()
    (w / "tiny.yaml").write_text(subprocess.run(g2p + ["config", "dump", "--preset", "tiny"], env=env, cwd=w,
                                                capture_output=True, text=True, check=True).stdout)
    params = _params(svc, w / "params.yaml", STAGE_STEPS, 2)
    local_root = w / "root"
    subprocess.run(g2p + ["data", "synth", "--out", str(local_root), "--preset", "tiny", "--quiet"], env=env, cwd=w,
                   check=True, capture_output=True)
    subprocess.run(g2p + ["data", "validate", "--root", str(local_root), "--out", str(w / "validation"),
                          "--params", str(params), "--quiet"], env=env, cwd=w, check=True, capture_output=True)
    client = svc.s3.client()
    for f in sorted(local_root.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), svc.s3.bucket, f"data/{f.relative_to(local_root)}")
    shutil.rmtree(local_root)  # from here on the images exist in the bucket only
    root_uri = svc.s3.uri("data")
    prep, lat, models = w / "prepared", w / "latents", w / "models"
    dvc_out = ["--metrics-dir", str(w / "metrics"), "--plots-dir", str(w / "plots"), "--params", str(params)]
    _run(svc, "prepare", "pipelines.prepare", "--valid", str(w / "validation" / "valid.parquet"),
         "--root", root_uri, "--out", str(prep), "--params", str(params), "--quiet")
    _run(svc, "pretrain_conditioner", "pipelines.stage", "--stage", "pretrain_conditioner",
         "--data", str(prep / "pretrain"), "--out", str(models / "pretrain_conditioner"), *dvc_out)
    _run(svc, "train_vae", "pipelines.stage", "--stage", "train_vae", "--data", str(prep / "train"),
         "--init-model", str(models / "pretrain_conditioner"), "--out", str(models / "train_vae"), *dvc_out)
    _run(svc, "encode_latents", "pipelines.latents", "--model", str(models / "train_vae"), "--prepared", str(prep),
         "--out", str(lat), "--params", str(params), "--quiet")
    _run(svc, "train_base", "pipelines.stage", "--stage", "train_base", "--data", str(lat / "train"),
         "--init-model", str(models / "train_vae"), "--out", str(models / "train_base"), *dvc_out)
    _run(svc, "train_diffusion", "pipelines.stage", "--stage", "train_diffusion", "--data", str(lat / "train"),
         "--init-model", str(models / "train_base"), "--out", str(models / "train_diffusion"), *dvc_out)
    _run(svc, "train_aligner", "pipelines.stage", "--stage", "train_aligner", "--data", str(lat / "train"),
         "--init-model", str(models / "train_diffusion"), "--grid-data", str(prep / "val"),
         "--out", str(models / "g2pdiffusion"), "--export", "pipeline", *dvc_out)
    return {"prepared": prep, "latents": lat, "models": models, "params": params}


def test_tiny_pipeline_on_the_cluster_with_s3_and_mlflow_over_http(services: Services, pipeline: dict) -> None:
    from mlflow import MlflowClient

    from g2p.pipeline import generate_uint8, load_pipeline
    from pipelines import shards

    svc = services
    for group in ("train", "val", "test", "pretrain"):  # shards in the bucket, manifests on the driver's side
        m = shards.read_manifest(pipeline["prepared"] / group)
        assert m["location"].startswith(f"s3://{svc.s3.bucket}/ray/prepared/"), m["location"]
        assert m["files"], f"prepared group {group} has no files"
    lat = shards.read_manifest(pipeline["latents"] / "train")
    assert lat["location"].startswith(f"s3://{svc.s3.bucket}/ray/latents/") and lat["rows"] == 25, lat
    pipe = load_pipeline(str(pipeline["models"] / "g2pdiffusion"))
    m = shards.load_arrays(pipeline["prepared"] / "val", None)
    img = generate_uint8(pipe, [m.barcode[0]], [None], [None], 1, 0, num_inference_steps=2)
    size = pipe.cfg.vae.image_size
    assert img.shape == (1, 1, 3, size, size) and img.dtype == torch.uint8
    # MLflow (over HTTP): a finished run per stage, with rank 0's step metrics and the model artifacts
    client = MlflowClient(svc.mlflow_url)
    exp = client.get_experiment_by_name("cluster-pipeline")
    assert exp is not None, "no MLflow experiment cluster-pipeline on the server"
    runs = {r.data.tags.get("g2p.stage"): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("g2p.kind") == "stage"}
    stages = ["pretrain_conditioner", "train_vae", "train_base", "train_diffusion", "train_aligner"]
    assert sorted(runs) == sorted(stages), f"MLflow stage runs: {sorted(runs)}"
    for st in stages:
        r = runs[st]
        assert r.info.status == "FINISHED", (st, r.info.status)
        hist = client.get_metric_history(r.info.run_id, "loss")
        assert [h.step for h in hist] == list(range(1, STAGE_STEPS + 1)), (st, [h.step for h in hist])
    keys = _s3_keys(svc, "mlflow/")
    assert any(k.endswith("model/model_index.json") for k in keys), "train_aligner's pipeline not in S3 artifacts"
    # Ray Train's checkpoints and step logs in the bucket, per stage run
    keys = _s3_keys(svc, "ray/")
    for st in stages:
        ckpts = {k.split("/")[2] for k in keys if k.startswith(f"ray/{st}-") and "/checkpoint_" in k}
        assert len(ckpts) >= 2, f"{st}: checkpoints in s3://{svc.s3.bucket}/ray: {sorted(ckpts)}"
        assert any(k.startswith(f"ray/{st}-") and k.endswith("/metrics.jsonl") for k in keys), st
        assert any(k.startswith(f"ray/{st}-") and "/init_model/" in k for k in keys) or st == "pretrain_conditioner"


def _train_worker_pids(cluster: RayCluster) -> list[int]:
    """Alive RayTrainWorker actors' pids (the state API of the cluster's dashboard), checked to be
    processes of this cluster (in a node's session: ``ray start`` runs in its own, and the raylet
    gives each worker its own process group, not its own session), never anyone else's."""
    from ray.util.state import list_actors

    groups = {n.proc.pid for n in cluster.nodes if n.proc is not None}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")], timeout=30)
    pids = []
    for a in actors:
        pid = int(a["pid"] if isinstance(a, dict) else a.pid)
        try:
            if os.getsid(pid) in groups:
                pids.append(pid)
        except ProcessLookupError:
            pass
    return pids


def _wait_step(log_uri: str, proc: subprocess.Popen, above: int, timeout: float, what: str) -> list[dict]:
    from pipelines.ray_train import read_log

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{what}: the stage exited ({proc.returncode}) before step {above}"
        rows = read_log(log_uri)
        if max((r["step"] for r in rows if r.get("event") == "step"), default=-1) > above:
            return rows
        time.sleep(1)
    raise AssertionError(f"{what}: no step above {above} in {log_uri} within {timeout:.0f} s")


def _stage_proc(svc: Services, params: Path, run_name: str, pipeline: dict, log: Path) -> subprocess.Popen:
    cwd = svc.work / "driver"
    cwd.mkdir(exist_ok=True)
    args = ["pipelines.ray_train", "--stage", "train_base", "--data", str(pipeline["latents"] / "train"),
            "--init-model", str(pipeline["models"] / "train_vae"), "--params", str(params), "--run-name", run_name,
            "--out", str(svc.work / f"out-{run_name}")]
    return subprocess.Popen(_cmd(svc, *args), cwd=cwd, env=svc.env(), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_killed_train_worker_restarts_from_the_last_checkpoint(services: Services, pipeline: dict) -> None:
    from pipelines import storage
    from pipelines.ray_train import read_log

    svc = services
    params = _params(svc, svc.work / "params-kill.yaml", KILL_STEPS, 5, max_failures=2)
    log_uri = storage.join(svc.storage, "kill-test", "metrics.jsonl")
    out = svc.work / "kill-test.log"
    t0 = time.perf_counter()
    proc = _stage_proc(svc, params, "kill-test", pipeline, out)
    try:
        _wait_step(log_uri, proc, 5, 600, "kill-test")  # past the first checkpoint (step 5): it is registered
        pids = _train_worker_pids(svc.cluster)
        assert len(pids) == 2, f"alive RayTrainWorker processes of the cluster: {pids}"
        os.kill(pids[-1], signal.SIGKILL)
        rc = proc.wait(timeout=600)
    finally:
        _stop(proc)
    TIMINGS["kill_test"] = time.perf_counter() - t0
    assert rc == 0, f"the stage did not survive a killed worker:\n{out.read_text()[-6000:]}"
    rows = read_log(log_uri)
    starts = [r for r in rows if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0, starts
    k = starts[1]["step"]
    assert k > 0 and k % 5 == 0, f"the second attempt started at step {k}, not at a checkpoint: {starts}"
    steps = [r["step"] for r in rows if r.get("event") == "step"]
    assert steps == list(range(1, KILL_STEPS + 1)), f"steps logged (each once): {steps}"


def test_a_stopped_s3_store_fails_the_stage_naming_the_uri_and_a_rerun_resumes(services: Services,
                                                                              pipeline: dict) -> None:
    from pipelines import storage
    from pipelines.ray_train import read_log

    svc = services
    params = _params(svc, svc.work / "params-s3.yaml", OUTAGE_STEPS, 5, max_failures=1)
    log_uri = storage.join(svc.storage, "s3-test", "metrics.jsonl")
    out = svc.work / "s3-test.log"
    t0 = time.perf_counter()
    proc = _stage_proc(svc, params, "s3-test", pipeline, out)
    try:
        rows = _wait_step(log_uri, proc, 5, 600, "s3-test")
        svc.s3.stop()
        rc = proc.wait(timeout=600)
    finally:
        _stop(proc)
        if svc.s3.proc is None or svc.s3.proc.poll() is not None:
            svc.s3.start()  # same data dir, same ports
    TIMINGS["s3_outage"] = time.perf_counter() - t0
    text = out.read_text()
    assert rc != 0, f"the stage finished although its storage was down:\n{text[-4000:]}"
    endpoint = f"s3://{svc.s3.bucket}/ray"
    assert endpoint in text, f"the failure does not name the storage URI {endpoint}:\n{text[-6000:]}"
    done = max(r["step"] for r in rows if r.get("event") == "step")
    t1 = time.perf_counter()
    proc = _stage_proc(svc, params, "s3-test", pipeline, out)
    try:
        rc = proc.wait(timeout=600)
    finally:
        _stop(proc)
    TIMINGS["s3_rerun"] = time.perf_counter() - t1
    assert rc == 0, f"the rerun after the store came back failed:\n{out.read_text()[-6000:]}"
    starts = [r for r in read_log(log_uri) if r.get("event") == "start"]
    assert starts[0]["step"] == 0 and starts[-1]["step"] >= 5 and starts[-1]["step"] % 5 == 0, starts
    assert starts[-1]["step"] <= done, (starts, done)
