"""A real multi-node Ray cluster on this machine for the tests: one ``ray start`` process per node.

    with RayCluster(tmp_path) as cluster:      # head + 1 worker node, 1 CPU each
        cluster.address                        # "127.0.0.1:<gcs port>"
        cluster.env()                          # what a driver needs: RAY_ADDRESS, RAY_AUTH_MODE
        cluster.nodes[1].temp_dir              # the worker node's own Ray temp dir

or the pytest fixture :func:`ray_cluster` (module scope; import it into a test module).

How it stays out of everyone else's way (the machine is shared):

- Every node is ``ray start --block`` in its own process group
  (``start_new_session``); teardown SIGTERMs the group, SIGKILLs it after a
  timeout, then kills (by pid) any process left whose command line names this
  cluster's temp dir. Never ``ray stop``: it kills *every* Ray process of the
  user on the machine, other sessions' clusters and local ``ray.init()`` too.
- Each node gets its own ``--temp-dir`` (Ray 2.60 allows it per node) under a
  short directory in /tmp: session dirs hold Unix sockets, whose paths must
  stay under ~107 bytes, which pytest's tmp_path can exceed. It also keeps
  ``ray_current_cluster`` out of /tmp/ray: a plain ``ray.init()`` elsewhere
  on the machine reads that file and would otherwise *join this cluster*.
- Every port Ray would otherwise take from a fixed default (GCS 6379,
  dashboard 8265, client server 10001, dashboard agent 52365, workers
  10002-19999, ...) is passed explicitly, picked free from 20000-32767: below
  Linux's ephemeral range (so the OS never hands them to someone's outgoing
  connection or ``bind(0)``) and above Ray's default worker range (used by
  every local ``ray.init()``). Picking and starting hold a lock file, and
  the ports of running clusters are listed in a registry file next to it
  (worker ranges are bound only when workers start, so a bind test alone
  misses them), so clusters started side by side never pick the same ports.
- ``cwd`` of every node is a directory outside the checkout and ``PYTHONPATH``
  is dropped, so workers can only get our code through the driver's
  ``runtime_env``.
- Token authentication is off (``RAY_AUTH_MODE=disabled``) on the nodes and
  in :meth:`RayCluster.env`: Ray 2.60 turns it on by default and a driver
  joining a ``ray start`` cluster failed with ``InvalidAuthToken``; fine for a
  loopback test cluster, not for a real one.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PORT_LO, PORT_HI = 20000, 32767  # below the ephemeral range (32768-60999), above Ray's default worker ports
WORKER_PORTS = 48  # per node: every worker process (task, actor, driver) holds one while it lives
LOCK_PATH = Path(tempfile.gettempdir()) / "g2p-raycluster-ports.lock"
# Ports given to running clusters, by owner (pid + temp root), shared across processes on the machine:
# a worker-port range is only bound when workers start, so a bind test alone cannot see it.
REGISTRY_PATH = Path(tempfile.gettempdir()) / "g2p-raycluster-ports.json"
_handed_out: set[int] = set()  # ports this process already gave a cluster (they may not be bound yet)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_registry() -> dict[str, dict]:
    """Entries of live owners only (call with the lock held)."""
    try:
        reg = json.loads(REGISTRY_PATH.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in reg.items() if isinstance(v, dict) and _pid_alive(int(v.get("pid", 0)))
            and Path(v.get("root", "/nonexistent")).exists()}


def _write_registry(reg: dict[str, dict]) -> None:
    tmp = REGISTRY_PATH.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(reg))
    os.replace(tmp, REGISTRY_PATH)


def ray_executable() -> str:
    """The ``ray`` CLI next to this interpreter (the venv's)."""
    here = Path(sys.executable).parent / "ray"
    if not here.exists():
        raise RuntimeError(f"RayCluster: no `ray` executable next to {sys.executable}")
    return str(here)


def _port_free(p: int) -> bool:
    for fam, host in ((socket.AF_INET, ""), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, p))
            except OSError:
                return False
    return True


def free_ports(n: int, block: int = 0) -> tuple[list[int], list[int]]:
    """``n`` single free ports and one contiguous free block of ``block`` ports, none handed out before."""
    rng = random.Random()
    singles: list[int] = []
    run: list[int] = []
    tries = 0
    while block and not run:
        tries += 1
        if tries > 500:
            raise RuntimeError(f"RayCluster: no {block} contiguous free ports in {PORT_LO}-{PORT_HI}")
        base = rng.randrange(PORT_LO, PORT_HI - block)
        cand = list(range(base, base + block))
        if not _handed_out.intersection(cand) and all(_port_free(p) for p in cand):
            run = cand
    _handed_out.update(run)
    while len(singles) < n:
        tries += 1
        if tries > 5000:
            raise RuntimeError(f"RayCluster: not enough free ports in {PORT_LO}-{PORT_HI}")
        p = rng.randrange(PORT_LO, PORT_HI)
        if p not in _handed_out and _port_free(p):
            singles.append(p)
            _handed_out.add(p)
    return singles, run


class NodeStartError(RuntimeError):
    """A node's ``ray start`` exited or did not come up in time."""


@dataclass
class Node:
    name: str
    head: bool
    temp_dir: Path
    cwd: Path
    log_path: Path
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    log: object = field(default=None, repr=False)


class RayCluster:
    """``num_nodes`` Ray nodes (the first one the head) of ``cpus_per_node`` CPUs, as separate processes."""

    def __init__(self, workdir: str | Path, num_nodes: int = 2, cpus_per_node: int = 1,
                 object_store_mb: int = 256, start_timeout: float = 180.0, retries: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError("RayCluster: num_nodes must be >= 1")
        self.dir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.cpus = cpus_per_node
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.start_timeout = start_timeout
        self.retries = retries  # fresh `ray start` attempts for a worker node that failed to come up
        self.failed_starts: list[str] = []  # log tails of those failures
        self.nodes: list[Node] = []
        self.root: Path | None = None  # short temp root in /tmp holding every node's --temp-dir
        self.gcs_port = self.dashboard_port = 0

    # -- what a driver uses -------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment for a driver joining this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}

    # -- start / stop -------------------------------------------------------

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "RAY_ADDRESS") and not k.startswith("PYTEST_")}
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # SIGTERM otherwise drains the node for up to 30 s before stopping it (Ray 2.60)
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        return env

    def _command(self, node: Node) -> list[str]:
        p = node.ports
        cmd = [ray_executable(), "start", "--block", "--disable-usage-stats",
               f"--num-cpus={self.cpus}", "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
               f"--temp-dir={node.temp_dir}",
               f"--node-manager-port={p['node_manager']}", f"--object-manager-port={p['object_manager']}",
               f"--min-worker-port={p['min_worker']}", f"--max-worker-port={p['max_worker']}",
               f"--dashboard-agent-listen-port={p['agent_http']}", f"--dashboard-agent-grpc-port={p['agent_grpc']}",
               f"--runtime-env-agent-port={p['runtime_env_agent']}", f"--metrics-export-port={p['metrics']}"]
        if node.head:
            cmd += ["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={p['client']}"]
        else:
            cmd += [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
        return cmd

    def _new_node(self, i: int, attempt: int = 0) -> Node:
        head = i == 0
        singles, block = free_ports(9 if head else 6, WORKER_PORTS)
        ports = dict(zip(("node_manager", "object_manager", "agent_http", "agent_grpc",
                          "runtime_env_agent", "metrics", "gcs", "dashboard", "client"), singles))
        ports.update(min_worker=block[0], max_worker=block[-1])
        if head:
            self.gcs_port, self.dashboard_port = ports["gcs"], ports["dashboard"]
        name = "head" if head else f"worker{i}"
        suffix = f"-retry{attempt}" if attempt else ""
        return Node(name, head, self.root / f"n{i}{suffix}", self.dir / f"{name}-cwd",
                    self.dir / f"{name}{suffix}.log", ports)

    def _spawn(self, node: Node) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        node.cwd.mkdir(parents=True, exist_ok=True)
        node.log = open(node.log_path, "wb")
        node.proc = subprocess.Popen(self._command(node), cwd=node.cwd, env=self._node_env(),
                                     stdout=node.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def _wait_node_started(self, node: Node, deadline: float) -> None:
        """``ray start`` writes ``ray_current_cluster`` into the node's temp dir once the node is up."""
        marker = node.temp_dir / "ray_current_cluster"
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise NodeStartError(f"RayCluster: `ray start` for the {node.name} node exited with "
                                   f"{node.proc.returncode}; its log {node.log_path}:\n{self._tail(node)}")
            if marker.exists():
                return
            time.sleep(0.3)
        raise NodeStartError(f"RayCluster: the {node.name} node did not start within {self.start_timeout:.0f} s; "
                           f"its log {node.log_path}:\n{self._tail(node)}")

    def _wait_gcs(self, node: Node, deadline: float) -> None:
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"RayCluster: `ray start --head` exited with {node.proc.returncode}; "
                                   f"its log {node.log_path}:\n{self._tail(node)}")
            try:
                with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"RayCluster: the head's GCS did not listen on {self.address} within "
                           f"{self.start_timeout:.0f} s; its log {node.log_path}:\n{self._tail(node)}")

    def alive_nodes(self) -> list[dict]:
        """Alive nodes, from the dashboard's state API (the one Train V2 uses)."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?limit=100", timeout=5) as r:
            body = json.load(r)
        rows = body["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def _wait_alive(self, deadline: float) -> None:
        last: object = None
        while time.time() < deadline:
            for n in self.nodes:
                if n.proc.poll() is not None:
                    raise RuntimeError(f"RayCluster: the {n.name} node's `ray start` exited with "
                                       f"{n.proc.returncode}; its log:\n{self._tail(n)}")
            try:
                alive = self.alive_nodes()
                if len(alive) >= self.num_nodes:
                    return
                last = f"{len(alive)} of {self.num_nodes} nodes alive"
            except Exception as e:  # dashboard not up yet
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"RayCluster: {self.num_nodes} nodes not alive at {self.dashboard_url} within "
                           f"{self.start_timeout:.0f} s (last: {last}); head log:\n{self._tail(self.nodes[0])}")

    def start(self) -> "RayCluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="g2prc-", dir="/tmp"))
        deadline = time.time() + self.start_timeout
        try:
            with open(LOCK_PATH, "a+") as lock:
                # held while picking ports and until Ray has bound them
                fcntl.flock(lock, fcntl.LOCK_EX)
                reg = _read_registry()
                for entry in reg.values():
                    _handed_out.update(entry.get("ports", []))
                mine = set(_handed_out)
                for i in range(self.num_nodes):
                    self.nodes.append(self._new_node(i))
                    self._spawn(self.nodes[-1])
                    if i == 0:  # the other nodes can start as soon as the GCS listens
                        self._wait_gcs(self.nodes[0], deadline)
                for i, node in enumerate(self.nodes):
                    for attempt in range(1, self.retries + 2):
                        try:
                            self._wait_node_started(self.nodes[i], deadline)
                            break
                        except NodeStartError:
                            # on a loaded machine a raylet can miss Ray's fixed 30 s registration
                            # deadline and `ray start` gives up; a fresh start usually makes it
                            if i == 0 or attempt > self.retries or time.time() > deadline:
                                raise
                            self.failed_starts.append(self._tail(self.nodes[i]))
                            self._kill(self.nodes[i])
                            self.nodes[i] = self._new_node(i, attempt)
                            self._spawn(self.nodes[i])
                ours = sorted(_handed_out - mine)  # every port (and worker range) this start picked
                reg[str(self.root)] = {"pid": os.getpid(), "root": str(self.root), "ports": ours}
                _write_registry(reg)
                self._wait_alive(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _tail(node: Node, n: int = 4000) -> str:
        try:
            return node.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def leftover_pids(self) -> list[int]:
        """Processes still running whose command line names this cluster's temp root (raylets, workers, ...)."""
        if self.root is None:
            return []
        import psutil

        needle = str(self.root)
        pids = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] == os.getpid():
                continue
            if needle in " ".join(proc.info["cmdline"] or ()):
                pids.append(proc.info["pid"])
        return pids

    def _kill(self, node: Node, timeout: float = 20.0) -> None:
        self._kill_all([node], timeout)

    @staticmethod
    def _kill_all(nodes: list[Node], timeout: float) -> None:
        started = [n for n in nodes if n.proc is not None]
        for node in started:
            if node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.time() + timeout
        for node in started:
            try:
                node.proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for node in started:
            try:  # whatever is left in the group, also after `ray start` itself exited
                os.killpg(node.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if node.log:
                node.log.close()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every node's process group, SIGKILL what is left after ``timeout``, then stragglers by pid;
        each node's Ray logs are copied to ``<workdir>/<node>-ray-logs`` before its temp dir goes."""
        self._kill_all(self.nodes, timeout)
        end = time.time() + 10
        while (left := self.leftover_pids()) and time.time() < end:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.3)
        if left:
            raise RuntimeError(f"RayCluster: processes of the cluster in {self.root} survived SIGKILL: {left}")
        if self.root is not None:
            for d in sorted(self.root.iterdir()) if self.root.exists() else []:
                logs = d / "session_latest" / "logs"
                if logs.is_dir():
                    shutil.copytree(logs, self.dir / f"{d.name}-ray-logs", dirs_exist_ok=True,
                                    ignore_dangling_symlinks=True, symlinks=False)
            shutil.rmtree(self.root, ignore_errors=True)
            with open(LOCK_PATH, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                reg = _read_registry()  # our root is gone: our entry drops out
                reg.pop(str(self.root), None)
                _write_registry(reg)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _fixture():
    import pytest

    @pytest.fixture(scope="module")
    def ray_cluster(tmp_path_factory) -> Iterator[RayCluster]:
        """A running two-node cluster (head + one worker node, 1 CPU each), stopped after the module."""
        with RayCluster(tmp_path_factory.mktemp("raycluster")) as cluster:
            yield cluster

    return ray_cluster


ray_cluster = _fixture()
