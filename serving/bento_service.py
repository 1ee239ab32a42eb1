"""BentoML 1.4 service with the Ray Serve app's API and validation.

    G2P_MODEL_DIR=models/g2pdiffusion bentoml serve serving.bento_service:G2PPhenotypes --port 3000
    bentoml serve serving.bento_service:G2PPhenotypes          # models:/g2pdiffusion@champion
    bentoml build                                               # bentofile.yaml -> a Bento

The model comes from the environment: ``G2P_MODEL_DIR`` (+ ``G2P_JUDGE_DIR``)
for a folder, else ``G2P_MODEL_URI`` (default: ``serve.model_uri``, the
registry champion) from ``MLFLOW_TRACKING_URI``. ``G2P_PARAMS`` names the
params file whose ``serve`` section bounds requests (default ``params.yaml``).

Routes: ``POST /v1/phenotypes`` and ``POST /v1/vary`` (BentoML APIs with typed,
bounded parameters), ``GET /v1/model`` (a mounted FastAPI), BentoML's own
``/healthz``, ``/readyz``, ``/docs``. Validation is ``serving.schema``'s (the
model's own barcode and place rules); a broken rule is a 422 naming the field
and the value, as in the Ray Serve app.
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus
from typing import Annotated, Any, Optional

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from pydantic import Field, ValidationError

from serving.config import load_serve_section
from serving.schema import PhenotypeRequest, VaryRequest, error_message

SECTION = load_serve_section(os.environ.get("G2P_PARAMS", "params.yaml"))


def _bounds(lo: float, hi: float) -> Any:
    """Bounds stated in the OpenAPI schema; enforced by ``serving.schema`` so a violation is the same
    422 naming the field and the value as on Ray Serve (BentoML's own check would be a 400 without the value)."""
    return Field(json_schema_extra={"minimum": lo, "maximum": hi})


class JSONBodyCheck:
    """ASGI middleware: a malformed JSON body on a ``/v1/`` POST is a 422 naming the body (as on Ray Serve)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out = json.dumps({"error": f"body={body[:60].decode('utf-8', 'replace')!r}: malformed JSON ({e})"}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
            return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Unprocessable(BentoMLException):
    """A request that breaks a rule: HTTP 422, the message names the field and the value."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


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

    def _parse(self, schema: type, data: dict[str, Any]):
        try:
            return schema.parse({k: v for k, v in data.items() if v is not None or k in ("latitude", "longitude")},
                                SECTION)
        except (ValidationError, ValueError) as e:
            raise Unprocessable(error_message(e)) from None

    @bentoml.api(route="/v1/phenotypes")
    def phenotypes(
        self,
        barcode: Annotated[str, Field(description="COI barcode (A/C/G/T/N)")],
        latitude: Optional[float] = None,
        longitude: Optional[float] = None,
        n: Optional[Annotated[int, _bounds(1, SECTION.max_n)]] = None,
        steps: Optional[Annotated[int, _bounds(1, SECTION.max_steps)]] = None,
        guidance_scale: Optional[Annotated[float, _bounds(0, 50)]] = None,
        cfg_scale: Optional[Annotated[float, _bounds(0, 50)]] = None,
        seed: Annotated[int, _bounds(0, 2**63 - 1)] = 0,
    ) -> dict[str, Any]:
        """Generate ``n`` phenotype images (base64 PNG) with judge scores, model and data version."""
        req = self._parse(PhenotypeRequest, dict(barcode=barcode, latitude=latitude, longitude=longitude, n=n,
                                                 steps=steps, guidance_scale=guidance_scale, cfg_scale=cfg_scale,
                                                 seed=seed))
        return self.service.predict(req).model_dump()

    @bentoml.api(route="/v1/vary")
    def vary(
        self,
        barcode: str,
        latitude: Optional[float] = None,
        longitude: Optional[float] = None,
        rates: Optional[list[float]] = None,
        latitudes: Optional[list[float]] = None,
        steps: Optional[Annotated[int, _bounds(1, SECTION.max_steps)]] = None,
        guidance_scale: Optional[Annotated[float, _bounds(0, 50)]] = None,
        cfg_scale: Optional[Annotated[float, _bounds(0, 50)]] = None,
        seed: Annotated[int, _bounds(0, 2**63 - 1)] = 0,
    ) -> dict[str, Any]:
        """Mutation and latitude sweeps (``g2p vary``), one image per variant."""
        req = self._parse(VaryRequest, dict(barcode=barcode, latitude=latitude, longitude=longitude, rates=rates,
                                            latitudes=latitudes, steps=steps, guidance_scale=guidance_scale,
                                            cfg_scale=cfg_scale, seed=seed))
        return self.service.vary(req).model_dump()


G2PPhenotypes.add_asgi_middleware(JSONBodyCheck)
