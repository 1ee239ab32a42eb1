"""What a registered model carries besides its folders: the bundled code, pinned requirements,
the signature and input example, and the preflight that loads and predicts before anything is logged.

Used by :func:`pipelines.registry.register`; MLflow is imported only where a signature is built.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PYFUNC_FILE = Path(__file__).with_name("g2p_pyfunc.py")
RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pandas",
                    "pyarrow", "pillow", "pyyaml", "tqdm", "pydantic", "mlflow")


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def bundle_package(name: str, dest: Path, patterns: tuple[str, ...] = ("*.py",)) -> tuple[Path, str]:
    """A copy of package ``name``'s files matching ``patterns`` (no caches) under ``dest``; and their sha256."""
    import importlib

    src = Path(importlib.import_module(name).__file__).parent
    h = hashlib.sha256()
    files = sorted({f for p in patterns for f in src.rglob(p) if f.is_file()})
    for f in files:
        rel = f.relative_to(src)
        if "__pycache__" in rel.parts:
            continue
        h.update(str(rel).encode() + b"\0" + f.read_bytes())
        (dest / name / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / name / rel)
    return dest / name, h.hexdigest()


def bundle_g2p(dest: Path) -> tuple[Path, str]:
    """A copy of the ``g2p`` package's sources (no caches) under ``dest``; and their sha256."""
    return bundle_package("g2p", dest)


def bundle_serving(dest: Path) -> tuple[Path, str]:
    """A copy of the ``serving`` package (sources and the page's static files) under ``dest``; and their sha256."""
    return bundle_package("serving", dest, ("*.py", "static/*"))


def signature_and_example(example_barcode: str, steps: int) -> tuple[Any, Any]:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "barcode"), ColSpec("double", "latitude", required=False),
        ColSpec("double", "longitude", required=False), ColSpec("long", "n", required=False),
        ColSpec("long", "steps", required=False), ColSpec("double", "guidance_scale", required=False),
        ColSpec("double", "aligner_guidance_scale", required=False), ColSpec("string", "scheduler", required=False),
        ColSpec("long", "seed", required=False),
    ])
    outputs = Schema([
        ColSpec("long", "row"), ColSpec("long", "sample"), ColSpec("string", "barcode"), ColSpec("long", "seed"),
        ColSpec("binary", "image"), ColSpec("double", "score", required=False),
    ])
    example = pd.DataFrame([{"barcode": example_barcode, "latitude": 45.5, "longitude": -73.6, "n": 1,
                             "steps": steps, "guidance_scale": 3.0, "aligner_guidance_scale": 1.0,
                             "scheduler": "ddim", "seed": 0}])
    return ModelSignature(inputs=inputs, outputs=outputs), example


def example_barcode(length: int = 658, seed: int = 0) -> str:
    """A fixed COI-length DNA string for the input example (any A/C/G/T barcode is valid input)."""
    import random

    rng = random.Random(seed)
    return "".join(rng.choice("ACGT") for _ in range(length))


def preflight(artifacts: Mapping[str, str], info: Mapping[str, Any], example: Any) -> Any:
    """Load the folders and predict the input example with the pyfunc's own code, before anything is logged.

    A generator folder from older code (say, without a module the current UNet
    has) must stop the stage with its reason, not be registered broken.
    """
    from types import SimpleNamespace

    from pipelines.g2p_pyfunc import OUTPUT_COLUMNS, G2PModel

    model = G2PModel()
    try:
        model.load_context(SimpleNamespace(artifacts=dict(artifacts), model_config=dict(info)))
        out = model.predict(None, example)
    except Exception as e:
        raise ValueError(f"register: the model in {artifacts['generator']!r} (judge: {artifacts.get('judge')!r}) "
                         f"does not load or predict with this code: {type(e).__name__}: {e}") from e
    if list(out.columns) != list(OUTPUT_COLUMNS) or len(out) != int(example["n"].sum()):
        raise ValueError(f"register: the input example gave {len(out)} rows with columns {list(out.columns)}")
    return out
