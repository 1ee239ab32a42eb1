"""The registered model's code: an MLflow pyfunc around g2p's Generator and Judge.

Logged as a *model from code* (``mlflow.pyfunc.log_model(python_model=<this
file>)``): MLflow stores this file's source, not a pickle, and runs it at load
time; the ``set_model`` call at the bottom names the model object. The weights
travel as artifacts in their own safetensors folders:

- ``generator``: a :meth:`G2PDiffusion.save_pretrained` folder (tokenizer,
  conditioner, VAE, UNet + LoRA, aligner, negative bank, config with the
  scheduler and sampling settings);
- ``judge`` (optional): a :meth:`g2p.judge.Judge.save_pretrained` folder; when
  the registering run had none, ``info["judge"] == "absent"`` and scores are
  None;
- ``metrics``: the evaluation's ``reports/metrics.json`` (kept for reading).

This file imports only ``g2p`` (and torch, pandas, PIL, mlflow): the package
is bundled with the model (``code_paths``), so a loaded model works outside
this repository too (see ``pipelines/registry.py``).

Input (one row per condition): ``barcode`` (str, required), ``latitude``,
``longitude`` (float, NaN/absent = unknown place), ``num_images`` (default 1),
``steps``, ``guidance_scale`` (aligner w), ``cfg_scale`` (default: the
checkpoint's ``sampling`` section), ``seed`` (default 0). Output: one row per
image: ``row`` (input row), ``sample``, ``barcode``, ``seed``, ``image`` (PNG
bytes), ``score`` (the judge's cosine, or None). Same inputs and seed -> same
images.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import mlflow
import pandas as pd

MAX_IMAGES = 64
MAX_STEPS = 1000
INPUT_COLUMNS = ("barcode", "latitude", "longitude", "num_images", "steps", "guidance_scale", "cfg_scale", "seed")
OUTPUT_COLUMNS = ("row", "sample", "barcode", "seed", "image", "score")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _opt_int(row: dict, key: str, i: int, default: int | None, lo: int, hi: int) -> int | None:
    v = row.get(key)
    if _missing(v):
        return default
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{key}[{i}]: {v!r} is not a whole number")
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"{key}[{i}]: {v!r} must be in [{lo}, {hi}]")
    return v


def _opt_float(row: dict, key: str, i: int) -> float | None:
    v = row.get(key)
    if _missing(v):
        return None
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{key}[{i}]: {v!r} is not a finite number")
    return v


def png_bytes(image: Any) -> bytes:
    """uint8 tensor (3, H, W) -> PNG bytes."""
    from g2p.generate import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


class G2PModel(mlflow.pyfunc.PythonModel):
    """``.generator`` (g2p Generator), ``.judge`` (g2p Judge or None), ``.info`` (lineage dict)."""

    generator: Any = None
    judge: Any = None
    info: dict[str, Any]

    def load_context(self, context: Any) -> None:
        import torch

        from g2p.generate import Generator

        device = os.environ.get("G2P_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.info = dict(context.model_config or {})
        self.generator = Generator.from_checkpoint(context.artifacts["generator"], device=device)
        judge_dir = context.artifacts.get("judge")
        if judge_dir and os.path.isdir(judge_dir):
            from g2p.judge import Judge

            self.judge = Judge.from_pretrained(judge_dir, device=device).eval()
            self.info.setdefault("judge", "bundled")
        else:
            self.judge = None
            self.info["judge"] = "absent"
        self.info.setdefault("model_version", None)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "barcode" not in model_input.columns:
            raise ValueError(f"model_input: column 'barcode' is required (got {list(model_input.columns)})")
        unknown = set(model_input.columns) - set(INPUT_COLUMNS)
        if unknown:
            raise ValueError(f"model_input: unknown column {sorted(unknown)[0]!r} (known: {list(INPUT_COLUMNS)})")
        out: list[dict[str, Any]] = []
        for i, row in enumerate(model_input.to_dict("records")):
            barcode = row["barcode"]
            if not isinstance(barcode, str):
                raise ValueError(f"barcode[{i}]: {barcode!r} is not a string")
            n = _opt_int(row, "num_images", i, 1, 1, MAX_IMAGES)
            steps = _opt_int(row, "steps", i, None, 1, MAX_STEPS)
            seed = _opt_int(row, "seed", i, 0, 0, 2**63 - 1)
            lat, lon = _opt_float(row, "latitude", i), _opt_float(row, "longitude", i)
            if (lat is None) != (lon is None):
                raise ValueError(f"latitude[{i}], longitude[{i}]: give both or neither (got {lat!r}, {lon!r})")
            images = self.generator.generate(
                [barcode], [lat], [lon], n=n, steps=steps, guidance_scale=_opt_float(row, "guidance_scale", i),
                cfg_scale=_opt_float(row, "cfg_scale", i), seed=seed)[0]  # (n, 3, H, W) uint8
            scores: list[float | None] = [None] * n
            if self.judge is not None:
                with torch.no_grad():
                    scores = [float(s) for s in self.judge.score(images, [barcode] * n).cpu()]
            out += [{"row": i, "sample": j, "barcode": barcode, "seed": seed, "image": png_bytes(images[j]),
                     "score": scores[j]} for j in range(n)]
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(G2PModel())
