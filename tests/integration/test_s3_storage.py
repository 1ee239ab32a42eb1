"""A real S3 store (SeaweedFS on loopback) behind the pipeline's storage: pyarrow URIs, a DVC remote, MLflow.

Every service is really started: ``weed server`` (S3), ``dvc`` against an S3
remote, ``mlflow server`` over HTTP with its artifacts in the bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3store import S3Store, free_ports
from serving.testing import wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with S3Store(tmp_path_factory.mktemp("s3")) as store:
        yield store


def test_storage_by_uri_round_trips_a_folder_and_names_the_uri_on_failure(s3, tmp_path: Path, monkeypatch) -> None:
    from pipelines import storage

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.safetensors").write_bytes(b"\x00" * 1000)
    (src / "sub" / "config.json").write_text('{"x": 1}')
    uri = s3.uri("models/judge")
    assert storage.resolve(uri) == uri and storage.resolve("rel/x") == str(Path("rel/x").resolve())
    assert storage.is_uri(uri) and not storage.is_uri("outputs/ray")
    assert storage.join(uri, "sub") == s3.uri("models/judge/sub")
    storage.upload(src, uri)
    assert storage.exists(uri) and storage.exists(storage.join(uri, "sub", "config.json"))
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="models/judge")["Contents"]
            if not o["Key"].endswith("/")}  # pyarrow's directory markers aside
    assert keys == {"models/judge/a.safetensors", "models/judge/sub/config.json"}
    back = storage.download(uri, tmp_path / "back")
    assert (back / "sub" / "config.json").read_text() == '{"x": 1}' and (back / "a.safetensors").stat().st_size == 1000
    with pytest.raises(storage.StorageError, match="models/nothing"):
        storage.download(s3.uri("models/nothing"), tmp_path / "none")
    dead = f"s3://{s3.bucket}/x?endpoint_override=127.0.0.1:{free_ports(1)[0]}&scheme=http"
    with pytest.raises(storage.StorageError, match=r"s3://g2p-test/x\?endpoint_override"):
        storage.upload(src, dead)


def _run(*cmd: str, cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_dvc_pushes_and_pulls_a_data_version_through_an_s3_remote(s3, tmp_path: Path) -> None:
    env = {**os.environ, **s3.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    repo = tmp_path / "repo"
    (repo / "data" / "bioscan5m").mkdir(parents=True)
    (repo / "data" / "bioscan5m" / "records.csv").write_text("processid,split\nA1,train\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"],
                ["dvc", "remote", "add", "-d", "store", f"s3://{s3.bucket}/dvcstore"],
                ["dvc", "remote", "modify", "store", "endpointurl", s3.endpoint]):
        _run(*cmd, cwd=repo, env=env)
    _run("dvc", "push", "-q", cwd=repo, env=env)
    stored = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="dvcstore/").get("KeyCount", 0)
    assert stored >= 2  # the file and the directory manifest
    # a fresh checkout of the same data.dvc: nothing local, everything from the remote
    import shutil

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run("dvc", "pull", "-q", cwd=repo, env=env)
    assert (repo / "data" / "bioscan5m" / "records.csv").read_text().startswith("processid,split")


def test_mlflow_tracking_server_over_http_keeps_artifacts_in_s3(s3, tmp_path: Path) -> None:

    port = free_ports(1)[0]
    env = {**os.environ, **s3.env()}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow", "--workers", "1"]
    log = open(tmp_path / "mlflow.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=300, proc=proc, log=tmp_path / "mlflow.log")  # a loaded box: slow
        from mlflow import MlflowClient

        client = MlflowClient(url)  # the client needs no S3 credentials: the server proxies artifacts
        exp = client.create_experiment("s3-test")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        art = tmp_path / "art"
        art.mkdir()
        (art / "model.safetensors").write_bytes(b"\x01" * 64)
        client.log_artifacts(run.info.run_id, str(art), "model")
        client.set_terminated(run.info.run_id)
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("model/model.safetensors") for k in keys), keys
        got = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
        assert (Path(got) / "model.safetensors").read_bytes() == b"\x01" * 64
        assert client.get_metric_history(run.info.run_id, "loss")[0].value == 0.5
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
