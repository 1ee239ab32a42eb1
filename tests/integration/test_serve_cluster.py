"""The RayService topology on this machine: a Ray head and a worker node (`ray start`, cwd outside the checkout,
tests/raycluster.py), the config `g2p serve config` writes deployed with Ray's own `serve deploy`, requests
served by model replicas on both nodes, and a new model reaching every replica through user_config (what
a promotion does, serving.serve_config.push_model) with no request dropped.

The code reaches the nodes as the config's runtime env: ``serve.working_dir`` is a zip of the checkout's
packages (``file://`` here; a repository archive URL on a real cluster). The proxy runs on the head only:
two proxies of nodes on one machine would bind the same port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.config import ServeSection
from serving.testing import free_port, tiny_model, tiny_pipeline, wait_http
from tests.raycluster import RayCluster, ray_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BARCODE = "ACGT" * 150
LOAD = 20  # requests per check


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def code_zip(tmp: Path) -> str:
    """The checkout's packages as a zip the nodes fetch (``working_dir``; caches left out)."""
    src = tmp / "code" / "g2pdiffusion"
    for pkg in ("g2p", "serving"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return "file://" + shutil.make_archive(str(tmp / "code"), "zip", root_dir=tmp / "code", base_dir="g2pdiffusion")


def test_serve_deploy_on_a_two_node_cluster_and_a_new_model_reaches_every_replica(
        ray_cluster: RayCluster, tmp_path: Path) -> None:  # noqa: F811
    from serving.serve_config import ModelConfig, push_model, serve_config, to_yaml, wait_running

    t0 = time.monotonic()
    tiny_model(tmp_path / "model_a", seed=0)
    tiny_pipeline(tmp_path / "model_b", seed=1)
    section = ServeSection(default_n=1, default_steps=2, max_batch_size=4, batch_wait_timeout_s=0.05,
                           num_replicas=2, num_cpus=1, port=free_port(), working_dir=code_zip(tmp_path))
    config = serve_config(section, model=ModelConfig(model_dir=str(tmp_path / "model_a")))
    config["proxy_location"] = "HeadOnly"
    (tmp_path / "serve.yaml").write_text(to_yaml(config))
    dashboard = ray_cluster.dashboard_url
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    serve_cli = str(Path(sys.executable).parent / "serve")
    subprocess.run([serve_cli, "deploy", str(tmp_path / "serve.yaml"), "-a", dashboard], check=True,
                   cwd=tmp_path, env={**env, **ray_cluster.env()}, capture_output=True, timeout=120)
    app = wait_running(dashboard, ["g2p"], timeout=240)["g2p"]
    url = f"http://127.0.0.1:{section.port}"
    wait_http(url + "/healthz", timeout=60)
    status = subprocess.run([serve_cli, "status", "-a", dashboard], check=True, capture_output=True, text=True,
                            cwd=tmp_path, env={**env, **ray_cluster.env()}, timeout=60).stdout
    assert "g2p" in status and "RUNNING" in status, status
    replicas = app["deployments"]["PhenotypeModel"]["replicas"]
    nodes = {r["node_id"] for r in replicas}
    assert len(replicas) == 2 and len(nodes) == 2, f"model replicas not on both nodes: {replicas}"
    deployed_at = time.monotonic() - t0

    req = {"barcode": BARCODE, "latitude": 10.0, "longitude": 20.0, "seed": 1}
    with ThreadPoolExecutor(4) as ex:
        first = list(ex.map(lambda i: call(url + "/v1/phenotypes", {**req, "seed": i}), range(LOAD)))
    assert all(code == 200 for code, _ in first), [r for r in first if r[0] != 200][:2]
    version_a = first[0][1]["model_version"]
    assert {r["model_version"] for _, r in first} == {version_a}

    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set() and len(results) < 200:
            results.append(call(url + "/v1/phenotypes", req))

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.5)
    push_model(dashboard, "g2p", model_dir=str(tmp_path / "model_b"), timeout=240)  # every replica reconfigured
    stop.set()
    t.join()
    with ThreadPoolExecutor(4) as ex:
        after = list(ex.map(lambda i: call(url + "/v1/phenotypes", {**req, "seed": i}), range(LOAD)))
    assert results and all(code == 200 for code, _ in results + after), \
        [r for r in results + after if r[0] != 200][:2]
    assert {r["model_version"] for _, r in after} == {after[0][1]["model_version"]} != {version_a}
    assert results[0][1]["model_version"] == version_a
    print(f"\ncluster serve: deployed in {deployed_at:.0f} s, whole test {time.monotonic() - t0:.0f} s, "
          f"{len(results)} requests during the swap")
