"""BentoML 1.4 service with the Ray Serve app's API and validation, batched like it.

    G2P_MODEL_DIR=models/g2pdiffusion bentoml serve serving.bento_service:G2PPhenotypes --port 3000
    bentoml serve serving.bento_service:G2PPhenotypes          # models:/g2pdiffusion@champion
    bentoml build                                               # bentofile.yaml -> a Bento

Two services, BentoML's pattern for adaptive batching behind an HTTP front:

- ``G2PPhenotypes`` (the entry service, no model) answers HTTP: ``POST
  /v1/phenotypes`` and ``POST /v1/vary`` (BentoML APIs whose ``input_spec`` is
  ``serving.schema.request_models(serve)``'s model, the one Ray Serve's body is
  typed with, so ``/docs`` states the same bounds), ``GET /v1/model`` (a
  mounted FastAPI), BentoML's own ``/healthz``, ``/readyz`` (ready once the
  generator is), ``/docs``. It hands each request to the generator.
- ``G2PGenerator`` (a dependency, its own process) holds the model. Its
  ``generate`` API is ``batchable``: BentoML's dispatcher gathers the calls
  that arrive while a batch runs (up to ``serve.max_batch_size`` requests;
  ``max_latency_ms`` = ``serve.request_timeout_s``) into one
  ``PhenotypeService.predict_batch`` call, the function Ray Serve's
  ``@serve.batch`` calls. A request's images do not depend on its batch (see
  ``serving.core``); each response's ``batch_size`` says how many requests
  its call answered, and ``/v1/model``'s ``extra.batching.batches`` counts
  the calls by batch size. ``serve.max_batch_size: 1`` turns batching off.
  BentoML sizes its batch window itself (it learns the call time);
  ``serve.batch_wait_timeout_s`` is Ray Serve's alone. A request the
  dispatcher expects to finish past ``max_latency_ms`` is refused (503); a
  504 ends the front's wait, not a batch already running.

The model comes from the environment: ``G2P_MODEL_DIR`` (+ ``G2P_JUDGE_DIR``)
for a folder, else ``G2P_MODEL_URI`` (default: ``serve.model_uri``, the
registry champion) from ``MLFLOW_TRACKING_URI``. ``G2P_PARAMS`` names the
params file whose ``serve`` section bounds requests (default ``params.yaml``).

An ASGI middleware validates the two POST bodies with the shared request model
first, so a broken rule (or malformed JSON) is the Ray Serve app's 422 body
``{"detail", "errors": [{field, value, message}]}`` (BentoML's own check would
be a 400 without the value), and ``timeout_s`` (default
``serve.request_timeout_s``) is the Ray Serve app's 504 body.
"""

from __future__ import annotations

import asyncio
import collections
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


BATCHED = SECTION.max_batch_size > 1


@bentoml.service(
    name="g2p_generator",
    resources={"cpu": str(max(1, int(SECTION.num_cpus))), **({"gpu": SECTION.num_gpus} if SECTION.num_gpus else {})},
    traffic={"timeout": SECTION.request_timeout_s},
    workers=1,
)
class G2PGenerator:
    """The model, in one process; ``generate`` answers a batch of phenotype requests in one call."""

    def __init__(self) -> None:
        self.service = _source().load(SECTION)
        self.batches: collections.Counter[int] = collections.Counter()  # requests per predict_batch call -> calls

    @bentoml.api(batchable=BATCHED, max_batch_size=max(2, SECTION.max_batch_size),
                 max_latency_ms=int(SECTION.request_timeout_s * 1000))
    def generate(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Phenotype requests (validated by the front) -> their responses, one ``predict_batch`` call."""
        reqs = [MODELS.phenotype.model_validate(p) for p in payloads]
        self.batches[len(reqs)] += 1
        return [r.model_dump() for r in self.service.predict_batch(reqs)]

    @bentoml.api
    def vary(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.service.vary(MODELS.vary.model_validate(payload)).model_dump()

    @bentoml.api
    async def info(self) -> dict[str, Any]:
        """What is served; async, so that it answers while a batch holds the API thread."""
        d = self.service.model_info().model_dump()
        batching = {"batchable": BATCHED, "max_batch_size": SECTION.max_batch_size,
                    "max_latency_ms": int(SECTION.request_timeout_s * 1000),
                    "batches": {str(k): v for k, v in sorted(self.batches.items())}}
        d["extra"] = {**d["extra"], "batching": batching}
        return d


info_app = FastAPI(title="G2PDiffusion model info")


@bentoml.asgi_app(info_app, path="/v1")
@bentoml.service(name="g2p_phenotypes", traffic={"timeout": SECTION.request_timeout_s}, workers=1)
class G2PPhenotypes:
    generator = bentoml.depends(G2PGenerator)

    @info_app.get("/model")
    async def model(self) -> dict[str, Any]:
        return await self.generator.to_async.info()

    @bentoml.api(route="/v1/phenotypes", input_spec=MODELS.phenotype)
    async def phenotypes(self, **fields: Any) -> dict[str, Any]:
        """Generate ``n`` phenotype images (base64 PNG) with judge scores, model and data version."""
        return (await self.generator.to_async.generate([fields]))[0]

    @bentoml.api(route="/v1/vary", input_spec=MODELS.vary)
    async def vary(self, **fields: Any) -> dict[str, Any]:
        """Mutation and latitude sweeps (``g2p vary``), one image per variant."""
        return await self.generator.to_async.vary(fields)


G2PPhenotypes.add_asgi_middleware(RequestCheck)
