"""Real DVC: swapping a real BIOSCAN-5M subset in, and a local remote round trip.

This is the workflow the README documents: import, `dvc add data`, commit,
`dvc push` to a remote, `dvc pull` elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def run(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_swap_in_real_subset_push_and_pull(tmp_path: Path, bioscan_sample_root: Path) -> None:
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.email", "t@example.org", cwd=repo)
    run("git", "config", "user.name", "t", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "config", "core.analytics", "false", cwd=repo)

    # 1. import a real subset into data/, version it, commit the pointer
    run("g2p", "data", "import-bioscan", "--root", str(bioscan_sample_root), "--out", "data",
        "--mode", "copy", "--quiet", cwd=repo)
    run("dvc", "add", "data", cwd=repo)
    assert (repo / "data.dvc").exists() and "/data" in (repo / ".gitignore").read_text()
    run("git", "add", "data.dvc", ".gitignore", ".dvc", cwd=repo)
    run("git", "commit", "-qm", "data: BIOSCAN-5M subset", cwd=repo)
    before = tree_digest(repo / "data")
    assert any(k.endswith(".jpg") for k in before) and any(k.endswith(".csv") for k in before)

    # 2. a local-folder remote, as the README documents
    run("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    run("dvc", "push", cwd=repo)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    # 3. a fresh checkout elsewhere: no data, no cache; pull restores the same bytes
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    run("dvc", "remote", "add", "-d", "-f", "local", str(remote), cwd=clone)
    assert not (clone / "data").exists()
    run("dvc", "pull", cwd=clone)
    assert tree_digest(clone / "data") == before

    # 4. a changed file is seen as a new version
    csv = next((clone / "data").rglob("*.csv"))
    csv.write_text(csv.read_text().replace("Diptera", "Dipteraa", 1))
    status = run("dvc", "status", "data.dvc", cwd=clone)
    assert "modified" in status
    shutil.rmtree(clone / "data")
