"""The Ray ``runtime_env`` a driver passes when it joins an existing cluster (``RAY_ADDRESS``).

On a cluster the code is not installed in advance: Ray uploads the ``g2p``
and ``pipelines`` package directories (``py_modules``) to the cluster's GCS,
and every worker process (tasks, actors, Ray Data, Ray Train workers) gets
them unpacked under its node's ``runtime_resources`` and put first on
``sys.path``. Third-party dependencies (torch, diffusers, ...) must already be
on the cluster's image; only our code travels.

Workers do not see the driver's environment either, so the variables they
need (S3 credentials and endpoint, MLflow, Train V2's poll interval) are
passed through ``env_vars`` when they are set on the driver.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Passed to every worker when set on the driver (unset ones are left out).
PASSTHROUGH_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    # The GCS the driver joined (host:port only, see runtime_env): without it a worker's state-API
    # call (Train V2's placement-group cleaner) guesses the cluster and, on a machine running more
    # than one Ray instance, fails with "Found multiple active Ray instances".
    "RAY_ADDRESS",
)
# gitignore-style patterns Ray leaves out of the uploaded packages.
EXCLUDES = ["__pycache__", "*.pyc", "*.pyo"]


def package_dirs() -> list[str]:
    """The ``g2p`` and ``pipelines`` package directories this driver imports (from their ``__file__``)."""
    import g2p
    import pipelines

    dirs = []
    for mod in (g2p, pipelines):
        if not getattr(mod, "__file__", None):
            raise RuntimeError(f"runtime_env: package {mod.__name__!r} has no __file__ (namespace package?); "
                               "cannot ship it to the cluster as a py_module")
        d = Path(mod.__file__).resolve().parent
        if not (d / "__init__.py").is_file():
            raise RuntimeError(f"runtime_env: {d} is not a package directory (no __init__.py)")
        dirs.append(str(d))
    return dirs


def runtime_env() -> dict[str, Any]:
    """``runtime_env`` for ``ray.init(address=...)``: our packages as ``py_modules``, caches excluded,
    and the workers' environment variables that are set here."""
    env: dict[str, Any] = {"py_modules": package_dirs(), "excludes": list(EXCLUDES)}
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    if "://" in env_vars.get("RAY_ADDRESS", "://") or env_vars.get("RAY_ADDRESS") == "auto":
        env_vars.pop("RAY_ADDRESS", None)  # a Ray Client address or "auto" means nothing inside the cluster
    if env_vars:
        env["env_vars"] = env_vars
    return env
