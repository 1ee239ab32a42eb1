"""The installable package: what the wheel holds, and the base install alone in a clean venv.

The wheel is built from a copy of the working tree (the files git tracks or would track), as
``pip install .`` builds it. The clean venv is made by uv (the ``test`` extra), which resolves
from the indexes pip is configured with (``pip config list``: index-url, extra-index-url,
find-links, constraint) and with ``constraints.txt``, and links packages from its cache
(``UV_CACHE_DIR``, default ``~/.cache/uv``, about 1.2 GB for the base set): a few seconds once
the cache is warm, about 25 s the first time on 2 cores. torch is pinned to the build this
interpreter runs (the Makefile installs it first: ``TORCH_SPEC``); for a CUDA build from
the PyTorch index, give uv that index too (``UV_EXTRA_INDEX_URL``).
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_import_isolation import FORBIDDEN as MLOPS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("g2p", "pipelines", "serving")
STATIC = ("index.html", "app.js", "style.css", "world.js")


def _uv() -> str:
    try:
        import uv
    except ImportError:  # pragma: no cover - the test extra installs it
        pytest.fail("uv is missing: `make install` installs the test extra (pip install -e '.[all,test]')")
    return uv.find_uv_bin()


def _pip_sources() -> tuple[list[str], list[str]]:
    """uv's options for the package sources pip is configured with here (none: PyPI, as pip), and
    pip's configured constraint files."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
    sources: dict[tuple[str, str], None] = {}
    constraints: dict[str, None] = {}
    for line in out.splitlines():  # global.find-links='/opt/wheels', :env:.find-links='...'
        key, _, value = line.partition("=")
        key = key.rsplit(".", 1)[-1]
        for v in value.strip().strip("'\"").split():
            if key in flags:
                sources[(flags[key], v)] = None
            elif key == "constraint":
                constraints[v] = None
    # pip takes the best version across all its sources; uv's default is the first index holding the name.
    args = [a for pair in sources for a in pair] + ["--index-strategy", "unsafe-best-match"]
    return args, list(constraints)


def _source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([_uv(), "build", "--quiet", "--wheel", "--out-dir", str(dist), *_pip_sources()[0], str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("g2p-*.whl")
    return whl


def test_wheel_holds_every_file_the_packages_ship(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every file of the three packages in the tree -- modules, the page, config templates -- is installed.
    shipped = {f for f in _source_files() if f.split("/")[0] in PACKAGES and "__pycache__" not in f}
    assert shipped - names == set(), "files of the packages that the wheel leaves out"
    assert {f"serving/static/{n}" for n in STATIC} <= names
    assert {n.split("/")[0] for n in names} == {*PACKAGES, wheel.name.split("-py3")[0] + ".dist-info"}
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    assert "Apache License" in zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE").decode()
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert {"pipeline", "serve", "all", "test"} <= set(meta.get_all("Provides-Extra"))
    base = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    names_base = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() for r in base}
    assert {"torch", "diffusers", "transformers", "peft", "safetensors"} <= names_base
    assert not names_base & {m.replace("_", "-") for m in MLOPS}  # the extras' packages, not the base's
    entry = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "g2p = pipelines.cli:main" in entry


SMOKE = f"""
import importlib, importlib.util, json, pkgutil, sys, tempfile
import torch
import g2p
from g2p import G2PDiffusionPipeline, preset
from g2p.model import G2PDiffusion
from g2p.pipeline import load_pipeline

for m in pkgutil.walk_packages(g2p.__path__, "g2p."):  # every module of the core, with the base deps alone
    importlib.import_module(m.name)
with tempfile.TemporaryDirectory() as d:
    torch.manual_seed(0)
    G2PDiffusion(preset("tiny")).save_pretrained(d + "/model")
    load_pipeline(d + "/model").save_pretrained(d + "/pipe")
    pipe = G2PDiffusionPipeline.from_pretrained(d + "/pipe")
    out = pipe("ACGT" * 60, latitude=45.4, longitude=-75.7, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0))
print(json.dumps({{"g2p": g2p.__file__, "image": list(out.images[0].size),
                  "installed": [n for n in {MLOPS!r} if importlib.util.find_spec(n)],
                  "loaded": sorted(n for n in sys.modules if n.split(".")[0] in {MLOPS!r})}}))
"""


def test_base_install_alone_runs_the_pipeline_in_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    import fcntl
    import json

    # A new venv every run, at a fixed place so that the bytecode compiled from its (cache-linked,
    # unchanged) files is reused: Python's pycache_prefix keys it by path. Compiling torch,
    # transformers and diffusers anew costs about 10 s of CPU; nothing else is carried over.
    home = ROOT / ".pytest_cache" / "g2p-clean-venv"
    home.mkdir(parents=True, exist_ok=True)
    venv = home / "venv"
    uv, (sources, pip_constraints) = _uv(), _pip_sources()
    base_python = getattr(sys, "_base_executable", sys.executable)
    torch = f"torch=={importlib.metadata.version('torch')}"  # the build the Makefile installed first
    constraints = [a for c in [str(ROOT / "constraints.txt"), *pip_constraints] for a in ("--constraint", c)]
    # -I and a cwd outside the checkout: the installed wheel is imported, not the source tree.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with open(home / "lock", "w") as lock:  # one run at a time in this checkout
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([uv, "venv", "--quiet", "--python", base_python, str(venv)], check=True, capture_output=True)
        py = venv / "bin" / "python"
        r = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(py), *sources, *constraints,
                            str(wheel), torch], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        r = subprocess.run([str(py), "-I", "-X", f"pycache_prefix={home / 'pycache'}", "-c", SMOKE], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        cli = subprocess.run([str(venv / "bin" / "g2p"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                             env=env)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["g2p"]).is_relative_to(venv), got["g2p"]
    assert got["installed"] == [], f"the base install pulled in {got['installed']}"
    assert got["loaded"] == []
    assert got["image"][0] > 0
    assert cli.returncode == 0 and "serve" in cli.stdout, cli.stderr[-2000:]
