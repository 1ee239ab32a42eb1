"""The model core imports no MLOps tool: checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("mlflow", "ray", "dvc", "great_expectations", "bentoml", "fastapi")


def test_importing_g2p_loads_no_mlops_module() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import g2p\n"
        "for m in pkgutil.walk_packages(g2p.__path__, 'g2p.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"g2p pulled in MLOps modules: {loaded}"
