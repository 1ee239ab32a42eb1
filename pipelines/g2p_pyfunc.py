"""The registered model's code: an MLflow pyfunc around g2p's G2PDiffusionPipeline and Judge.

Logged as a *model from code* (``mlflow.pyfunc.log_model(python_model=<this
file>)``): MLflow stores this file's source, not a pickle, and runs it at load
time; the ``set_model`` call at the bottom names the model object. The weights
travel as artifacts in their own safetensors folders:

- ``generator``: a ``G2PDiffusionPipeline.save_pretrained`` folder
  (``model_index.json``), or a ``G2PDiffusion.save_pretrained`` folder of the
  training layout (``config.json`` + ``denoiser.safetensors``, converted in
  memory at load): :func:`g2p.pipeline.load_pipeline` reads both, so models
  registered before the pipeline layout keep working;
- ``judge`` (optional): a :meth:`g2p.judge.Judge.save_pretrained` folder; when
  the registering run had none, ``info["judge"] == "absent"`` and scores are
  None;
- ``metrics``: the evaluation's ``reports/metrics.json`` (kept for reading).

This file imports ``g2p`` and ``serving.schema`` (+ ``serving.config``), whose
request model is the one the HTTP servers validate with: both packages are
bundled with the model (``code_paths``), so a loaded model works outside this
repository too (see ``pipelines/registry.py``).

Input (one row per condition), the HTTP request's field names: ``barcode``
(str, required), ``latitude``, ``longitude`` (float, NaN/absent = unknown
place), ``n`` (images, default 1, at most 64), ``steps`` (at most 1000),
``guidance_scale`` (classifier-free guidance), ``aligner_guidance_scale`` (the
paper's w), ``scheduler`` (ddim, ddpm, dpmsolver++, unipc, euler) -- absent
knobs take the model's ``sampling`` defaults -- and ``seed`` (default 0). A row
that breaks a rule is a ``ValueError`` naming the field and the row index
(``steps[0]: ...``). Output: one row per image: ``row`` (input row),
``sample``, ``barcode`` (normalised), ``seed``, ``image`` (PNG bytes),
``score`` (the judge's cosine, or None). The images of a row are those of
``pipe(barcode, latitude, longitude, num_images_per_barcode=n, ...,
generator=torch.Generator().manual_seed(seed))``: same inputs and seed, same
images, and the same bytes as the HTTP servers give.
"""

from __future__ import annotations

import math
import os
from typing import Any

import mlflow
import pandas as pd

MAX_IMAGES = 64
MAX_STEPS = 1000
INPUT_COLUMNS = ("barcode", "latitude", "longitude", "n", "steps", "guidance_scale", "aligner_guidance_scale",
                 "scheduler", "seed")
OUTPUT_COLUMNS = ("row", "sample", "barcode", "seed", "image", "score")


def row_model() -> type:
    """The shared request model (``serving.schema``) with the batch bounds of this model (n <= 64, steps <= 1000)."""
    from serving.config import ServeSection
    from serving.schema import request_models

    section = ServeSection(max_n=MAX_IMAGES, max_steps=MAX_STEPS, default_n=1, request_timeout_s=1e9)
    return request_models(section).phenotype


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def parse_row(model: type, row: dict[str, Any], i: int) -> Any:
    """One input row validated by the shared request model; ``ValueError`` naming field[i] and the value."""
    from pydantic import ValidationError

    from serving.schema import error_details

    data = {k: v for k, v in row.items() if not _missing(v)}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = []
        for d in error_details(e):
            reason = d["message"].split(": ", 1)[1] if ": " in d["message"] else d["message"]
            value = d["value"]
            shown = value[:37] + "..." if isinstance(value, str) and len(value) > 40 else value
            parts.append(f"{d['field']}[{i}]: {shown!r} is invalid: {reason}")
        raise ValueError("; ".join(parts)) from None


class G2PModel(mlflow.pyfunc.PythonModel):
    """``.pipeline`` (G2PDiffusionPipeline; ``.generator`` is the same object), ``.judge`` (Judge or None),
    ``.info`` (lineage dict)."""

    pipeline: Any = None
    judge: Any = None
    info: dict[str, Any]

    @property
    def generator(self) -> Any:
        return self.pipeline

    def load_context(self, context: Any) -> None:
        import torch

        from g2p.pipeline import load_pipeline

        device = os.environ.get("G2P_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.info = dict(context.model_config or {})
        self.pipeline = load_pipeline(context.artifacts["generator"], device=device)
        self._pipes: dict[str, Any] = {}
        judge_dir = context.artifacts.get("judge")
        if judge_dir and os.path.isdir(judge_dir):
            from g2p.judge import Judge

            self.judge = Judge.from_pretrained(judge_dir, device=device).eval()
            self.info.setdefault("judge", "bundled")
        else:
            self.judge = None
            self.info["judge"] = "absent"
        self.info.setdefault("model_version", None)

    def _pipe(self, scheduler: str | None) -> Any:
        if scheduler is None or scheduler == self.pipeline.cfg.sampling.scheduler:
            return self.pipeline
        pipes = self.__dict__.setdefault("_pipes", {})
        if scheduler not in pipes:
            pipes[scheduler] = self.pipeline.with_scheduler(scheduler)
        return pipes[scheduler]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from g2p.images import png_bytes
        from g2p.pipeline import images_uint8

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "barcode" not in model_input.columns:
            raise ValueError(f"model_input: column 'barcode' is required (got {list(model_input.columns)})")
        unknown = set(model_input.columns) - set(INPUT_COLUMNS)
        if unknown:
            raise ValueError(f"model_input: unknown column {sorted(unknown)[0]!r} (known: {list(INPUT_COLUMNS)})")
        model = row_model()
        rows = [parse_row(model, row, i) for i, row in enumerate(model_input.to_dict("records"))]  # all, first
        out: list[dict[str, Any]] = []
        for i, r in enumerate(rows):
            n = int(r.n or 1)
            imgs = self._pipe(r.scheduler)(
                r.barcode, r.latitude, r.longitude, num_images_per_barcode=n, num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale, aligner_guidance_scale=r.aligner_guidance_scale,
                generator=torch.Generator().manual_seed(int(r.seed)), output_type="pt").images
            images = images_uint8(imgs)  # (n, 3, H, W) uint8
            scores: list[float | None] = [None] * n
            if self.judge is not None:
                with torch.no_grad():
                    scores = [float(s) for s in self.judge.score(images, [r.barcode] * n).cpu()]
            out += [{"row": i, "sample": j, "barcode": r.barcode, "seed": int(r.seed), "image": png_bytes(images[j]),
                     "score": scores[j]} for j in range(n)]
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(G2PModel())
