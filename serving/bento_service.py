"""BentoML 1.4 service with the Ray Serve app's API and validation.

    G2P_MODEL_DIR=models/g2pdiffusion bentoml serve serving.bento_service:G2PPhenotypes --port 3000
    bentoml serve serving.bento_service:G2PPhenotypes          # models:/g2pdiffusion@champion
    bentoml build                                               # bentofile.yaml -> a Bento

The model comes from the environment: ``G2P_MODEL_DIR`` (+ ``G2P_JUDGE_DIR``)
for a folder, else ``G2P_MODEL_URI`` (default: ``serve.model_uri``, the
registry champion) from ``MLFLOW_TRACKING_URI``. ``G2P_PARAMS`` names the
params file whose ``serve`` section bounds requests (default ``params.yaml``).

Routes: ``POST /v1/phenotypes`` and ``POST /v1/vary`` (BentoML APIs whose
``input_spec`` is ``serving.schema.request_models(serve)``'s model, the one Ray
Serve's body is typed with, so ``/docs`` states the same bounds), ``GET
/v1/model`` (a mounted FastAPI), BentoML's own ``/healthz``, ``/readyz``,
``/docs``. An ASGI middleware validates the two POST bodies with that same
model first, so a broken rule (or malformed JSON) is the Ray Serve app's 422
body ``{"detail", "errors": [{field, value, message}]}`` (BentoML's own check
would be a 400 without the value), and ``timeout_s`` (default
``serve.request_timeout_s``) is the Ray Serve app's 504 body.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import bentoml
from fastapi import FastAPI

from serving.config import load_serve_section
from serving.schema import error_body, request_models

SECTION = load_serve_section(os.environ.get("G2P_PARAMS", "params.yaml"))
MODELS = request_models(SECTION)
CHECKED = {"/v1/phenotypes": MODELS.phenotype, "/v1/vary": MODELS.vary}


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    out = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


class RequestCheck:
    """ASGI middleware for the two POST routes: validate the body with the shared request model (422 naming
    field and value, as on Ray Serve), then run the route under ``timeout_s`` (504, as on Ray Serve)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        model = CHECKED.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        from pydantic import ValidationError

        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            if any(err.get("type") == "json_invalid" for err in e.errors()):
                shown = body[:60].decode("utf-8", "replace")
                message = f"body={shown!r}: malformed JSON ({e.errors()[0].get('msg')})"
                content = {"detail": message, "errors": [{"field": "body", "value": shown, "message": message}]}
            else:
                content = error_body(e)
            return await _send_json(send, 422, content)
        sent, started = False, False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        timeout = getattr(req, "timeout_s", None) or SECTION.request_timeout_s
        t0 = time.perf_counter()
        task = asyncio.ensure_future(self.app(scope, replay, watch))
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done or started:
            return await task
        task.cancel()
        await _send_json(send, 504, {
            "detail": f"timeout: the request ran past {timeout:g} s (timeout_s / serve.request_timeout_s) "
                      f"and was cancelled; the server keeps serving",
            "timeout_s": timeout, "elapsed_s": round(time.perf_counter() - t0, 3)})


def _source():
    from serving.core import ModelSource

    if os.environ.get("G2P_MODEL_DIR"):
        return ModelSource(model_dir=os.environ["G2P_MODEL_DIR"], judge_dir=os.environ.get("G2P_JUDGE_DIR"))
    return ModelSource(model_uri=os.environ.get("G2P_MODEL_URI", SECTION.model_uri),
                       tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))


info_app = FastAPI(title="G2PDiffusion model info")


@bentoml.asgi_app(info_app, path="/v1")
@bentoml.service(
    name="g2p_phenotypes",
    resources={"cpu": str(max(1, int(SECTION.num_cpus))), **({"gpu": SECTION.num_gpus} if SECTION.num_gpus else {})},
    traffic={"timeout": SECTION.request_timeout_s},
    workers=1,
)
class G2PPhenotypes:
    def __init__(self) -> None:
        self.source = _source()
        self.service = self.source.load(SECTION)

    @info_app.get("/model")
    def model(self) -> dict[str, Any]:
        return self.service.model_info().model_dump()

    @bentoml.api(route="/v1/phenotypes", input_spec=MODELS.phenotype)
    def phenotypes(self, **fields: Any) -> dict[str, Any]:
        """Generate ``n`` phenotype images (base64 PNG) with judge scores, model and data version."""
        return self.service.predict(MODELS.phenotype.model_validate(fields)).model_dump()

    @bentoml.api(route="/v1/vary", input_spec=MODELS.vary)
    def vary(self, **fields: Any) -> dict[str, Any]:
        """Mutation and latitude sweeps (``g2p vary``), one image per variant."""
        return self.service.vary(MODELS.vary.model_validate(fields)).model_dump()


G2PPhenotypes.add_asgi_middleware(RequestCheck)
