"""The official bioscan-dataset package reads a synthetic root (its own venv; see the script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Builds a separate 5.6 GB venv (torch + torchvision from PyPI) on first use, so
# `make test` leaves it out (see pyproject's addopts); `make check-bioscan-package`
# runs it. It is never skipped: it passes or fails.
pytestmark = [pytest.mark.integration, pytest.mark.bioscan_package]

REPO = Path(__file__).resolve().parents[2]


def test_official_package_reads_every_split() -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_bioscan_package.sh")], cwd=REPO, capture_output=True,
        text=True, timeout=900, env={**os.environ, "PY_MAIN": sys.executable},
    )
    assert out.returncode == 0, f"check_bioscan_package.sh failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "OK: bioscan-dataset read every split" in out.stdout
    for split in ("pretrain", "train", "val", "test", "key_unseen", "val_unseen", "test_unseen", "other_heldout"):
        assert f"\n{split}" in "\n" + out.stdout
