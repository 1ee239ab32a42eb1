"""Test helper: put back the environment variables a test changed."""

from __future__ import annotations

import os


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back variables saved as ``{name: os.environ.get(name)}`` (None: it was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
