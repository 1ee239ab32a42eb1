"""Ray Serve application: a FastAPI ingress in front of a batched model deployment.

    g2p serve [--host 127.0.0.1] [--port 8000]             # models:/g2pdiffusion@champion
    g2p serve --model-dir models/g2pdiffusion --judge-dir models/judge
    serve run serving.ray_app:app model_uri=models:/g2pdiffusion@champion   # Ray's own CLI
    g2p serve config > serve.yaml && serve deploy serve.yaml                # a running cluster

Routes (OpenAPI at ``/docs``): ``POST /v1/phenotypes``, ``POST /v1/vary``,
``GET /v1/model``, ``GET /v1/records`` (+ ``/v1/records/{processid}/image``),
``GET /healthz``, and the page at ``/``.

:func:`app` is the application builder (its typed arguments are
``serving.serve_config.AppArgs``); ``application`` is the same app with the
defaults, for ``serve build serving.ray_app:application``.

``PhenotypeModel`` batches concurrent requests with ``@serve.batch`` (sizes from
the ``serve`` section) and answers a whole batch with one
``PhenotypeService.predict_batch`` call. Which model it serves is its
``user_config`` (``serving.serve_config.ModelConfig``: a registry URI, pinned to
a version by a promotion, or a folder): Serve calls :meth:`PhenotypeModel.reconfigure`
when a replica starts and, in place, whenever the config's ``user_config``
changes (``serving.serve_config.push_model``). The new version is loaded beside
the old one and swapped in with one reference assignment: a batch already
running keeps the service it started with, and requests that arrive meanwhile
wait in Serve's queue, so no request is dropped. ``check_health`` fails when no
model is loaded or the last batches all failed, and Serve replaces the replica.

The ingress's FastAPI app is built on its replica from the ``serve`` section
(:func:`make_api`, Ray Serve's ``__serve_build_asgi_app__``): the request bodies
are typed with ``serving.schema.request_models(section)``, so FastAPI validates
them and the OpenAPI document states the real bounds; a ``RequestValidationError``
handler answers 422 with ``{"detail", "errors": [{field, value, message}]}``.
Every route documents each status it returns (200, 404, 422, 500, 503, 504).
"""


import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application

from serving.config import ServeSection
from serving.core import ModelSource, PhenotypeService
from serving.records import Records
from serving.serve_config import HEALTH, INGRESS_OPTIONS, AppArgs, ModelConfig, model_options
from serving.schema import (
    ErrorBody, ModelInfo, PhenotypeResponse, TimeoutBody, ValidationErrorBody, VaryResponse, error_body,
    request_models,
)

log = logging.getLogger("g2p.serve")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
                "world.js": "text/javascript"}


# ----------------------------------------------------------------------------
# the model deployment
# ----------------------------------------------------------------------------


MAX_FAILED_BATCHES = 3  # consecutive failed batches after which check_health fails (Serve replaces the replica)


@serve.deployment(max_ongoing_requests=64, **HEALTH)
class PhenotypeModel:
    def __init__(self, section: ServeSection) -> None:
        self.section = section
        self.models = request_models(section)
        self.service: PhenotypeService | None = None  # loaded by reconfigure (the user_config)
        self.config: ModelConfig | None = None
        self.reloads = 0
        self.reload_error: str | None = None
        self.failed_batches = 0
        self.last_error: str | None = None
        self.predict_batch.set_max_batch_size(section.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(section.batch_wait_timeout_s)

    # -- the model: user_config ----------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this when the replica starts and whenever ``user_config`` changes: load the model
        it names unless that version is already served. At start a failure fails the replica (the error
        is in ``serve status``); later the old version keeps serving and ``/v1/model`` shows the error."""
        try:
            config = ModelConfig.model_validate(user_config)
            fresh = await asyncio.to_thread(self._load, config.source())  # the loop keeps answering meanwhile
        except Exception as e:
            if self.service is None:
                raise
            self.reload_error = f"user_config {user_config}: {type(e).__name__}: {e}"
            log.warning("g2p serve: reload failed, keeping version %s: %s", self.service.model_version,
                        self.reload_error)
            return
        if fresh is not None:
            if self.service is not None:
                self.reloads += 1
            self.service = fresh  # one assignment: a batch already running keeps the service it took
            log.warning("g2p serve: now serving model version %s", fresh.model_version)
        self.config, self.reload_error = config, None

    def _load(self, source: ModelSource) -> PhenotypeService | None:
        """The source's model, or None if its version is the one served (a cheap registry lookup or stat)."""
        if self.service is not None and source.current_version() == self.service.model_version:
            return None
        return source.load(self.section)

    def check_health(self) -> None:
        if self.service is None:
            raise RuntimeError("no model loaded: the deployment has no user_config naming one")
        if self.failed_batches >= MAX_FAILED_BATCHES:
            raise RuntimeError(f"the last {self.failed_batches} batches failed; last error: {self.last_error}")

    def _serving(self) -> PhenotypeService:
        if self.service is None:
            raise RuntimeError("no model loaded: the deployment has no user_config naming one")
        return self.service

    # -- requests ------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def predict_batch(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        service = self._serving()  # snapshot: this batch finishes on the version it started with
        reqs = [self.models.phenotype.model_validate(p) for p in payloads]  # validated by the ingress already

        def run() -> list[dict[str, Any]]:
            return [r.model_dump() for r in service.predict_batch(reqs)]

        try:
            out = await asyncio.to_thread(run)
        except Exception as e:
            self.failed_batches += 1
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        self.failed_batches = 0
        return out

    async def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.predict_batch(payload)

    async def vary(self, payload: dict[str, Any]) -> dict[str, Any]:
        service = self._serving()
        req = self.models.vary.model_validate(payload)
        return (await asyncio.to_thread(service.vary, req)).model_dump()

    def info(self) -> dict[str, Any]:
        d = self._serving().model_info().model_dump()
        d["extra"] = {**d["extra"], "reloads": self.reloads, "reload_error": self.reload_error,
                      "user_config": self.config.dump() if self.config else None}
        return d

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self._serving().model_version}


# ----------------------------------------------------------------------------
# the HTTP API: typed bodies from the section's request models, every status documented
# ----------------------------------------------------------------------------

DESCRIPTION = """DNA barcode + place -> generated insect phenotype images, judge scores, model and data version.

Every rule a request must follow is in the request schemas (bounds from the server's `serve` section);
a request that breaks one is a 422 naming the field and the value. The images of a request are those of
`G2PDiffusionPipeline(barcode, latitude, longitude, num_images_per_barcode=n, num_inference_steps=steps,
guidance_scale, aligner_guidance_scale, generator=torch.Generator().manual_seed(seed))`, whatever the
request is batched with."""

_422 = {"model": ValidationErrorBody, "description": "the request breaks a rule of the schema: "
                                                     "each error names the field and the value"}
_500 = {"model": ErrorBody, "description": "generation failed inside the server (it keeps serving)"}
_503 = {"description": "the model replica's queue is full (Ray Serve back-pressure); retry later"}
_504 = {"model": TimeoutBody, "description": "the request ran past timeout_s (default serve.request_timeout_s) "
                                             "and was cancelled; the server keeps serving"}
POST_RESPONSES: dict[int | str, dict[str, Any]] = {422: _422, 500: _500, 503: _503, 504: _504}
GET_RESPONSES: dict[int | str, dict[str, Any]] = {500: _500, 503: _503}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content=error_body(exc))


def make_api(section: ServeSection, ingress: Any = None) -> FastAPI:
    """The FastAPI app of ``section``: typed request bodies (``serving.schema.request_models(section)``)
    and the responses of every status. ``ingress`` answers (an :class:`Ingress`; None only to read the
    OpenAPI document)."""
    models = request_models(section)
    PhenotypeRequest, VaryRequest = models.phenotype, models.vary
    api = FastAPI(title="G2PDiffusion phenotypes", description=DESCRIPTION, version="1")
    api.add_exception_handler(RequestValidationError, _validation_error)

    @api.post("/v1/phenotypes", response_model=PhenotypeResponse, responses=POST_RESPONSES,
              summary="Generate phenotype images for one barcode and place")
    async def phenotypes(req: PhenotypeRequest) -> Response:
        return await ingress.answer("predict", req.model_dump(), req.timeout_s)

    @api.post("/v1/vary", response_model=VaryResponse, responses=POST_RESPONSES,
              summary="Mutation and latitude sweeps (g2p vary)")
    async def vary(req: VaryRequest) -> Response:
        return await ingress.answer("vary", req.model_dump(), None)

    @api.get("/v1/model", response_model=ModelInfo, responses=GET_RESPONSES,
             summary="The served model: version, data version, limits")
    async def model_info() -> Response:
        return await ingress.answer_get("info")

    @api.get("/healthz", responses=GET_RESPONSES, summary="Liveness: the model replica answers")
    async def healthz() -> Response:
        return await ingress.answer_get("health")

    @api.get("/v1/records", responses=GET_RESPONSES,
             summary="Test records the page offers (barcode, place, species, real image)")
    async def records() -> list[dict[str, Any]]:
        return ingress.records.public()

    @api.get("/v1/records/{processid}/image", summary="The real image of a test record",
             response_class=FileResponse,
             responses={200: {"content": {"image/jpeg": {}}, "description": "the record's JPEG"},
                        404: {"model": ErrorBody, "description": "no such record, or it has no image"},
                        422: _422,
                        **GET_RESPONSES})
    async def record_image(processid: str) -> Response:
        path = ingress.records.image_path(processid)
        if path is None:
            return JSONResponse(status_code=404, content={"detail": f"processid={processid!r}: no image"})
        return FileResponse(path, media_type="image/jpeg")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            return JSONResponse(status_code=404, content={"detail": f"static file {name!r} not found"})
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the request schemas exactly as pydantic states them (FastAPI's own
        OpenAPI model reads bounds as floats: 2**63 - 1 would come out as 9.223372036854776e18)."""
        if api.openapi_schema is None:
            doc = FastAPI.openapi(api)
            for m in (PhenotypeRequest, VaryRequest):
                doc["components"]["schemas"][m.__name__] = m.model_json_schema()
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


@serve.deployment(**{k: v for k, v in INGRESS_OPTIONS.items() if k != "ray_actor_options"})
@serve.ingress()
class Ingress:
    """The HTTP ingress; its FastAPI app is built on the replica from the section (``make_api``)."""

    def __init__(self, model: Any, section: ServeSection, valid_parquet: str | None = None,
                 data_root: str | None = None) -> None:
        self.model, self.section = model, section
        self.records = Records.load(valid_parquet, data_root)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.section, self)

    async def _call(self, method: str, payload: Any, timeout: float) -> Any:
        resp = getattr(self.model, method).remote(*([] if payload is None else [payload]))

        async def get() -> Any:
            return await resp

        try:
            return await asyncio.wait_for(get(), timeout)
        except asyncio.TimeoutError:
            resp.cancel()
            raise

    async def answer(self, method: str, payload: dict[str, Any], timeout_s: float | None) -> Response:
        t0 = time.perf_counter()
        timeout = timeout_s or self.section.request_timeout_s
        try:
            out = await self._call(method, payload, timeout)
        except asyncio.TimeoutError:
            return JSONResponse(status_code=504, content={
                "detail": f"timeout: the request ran past {timeout:g} s "
                          f"(timeout_s / serve.request_timeout_s) and was cancelled; the server keeps serving",
                "timeout_s": timeout, "elapsed_s": round(time.perf_counter() - t0, 3)})
        except Exception as e:  # a failure inside the model: report it, keep serving
            log.exception("g2p serve: %s failed", method)
            return JSONResponse(status_code=500, content={"detail": f"{method} failed: {type(e).__name__}: {e}"})
        return JSONResponse(out)

    async def answer_get(self, method: str) -> Response:
        try:
            return JSONResponse(await self._call(method, None, self.section.request_timeout_s))
        except Exception as e:
            log.exception("g2p serve: %s failed", method)
            return JSONResponse(status_code=500, content={"detail": f"{method} failed: {type(e).__name__}: {e}"})


# ----------------------------------------------------------------------------
# building and running
# ----------------------------------------------------------------------------


def model_config(source: ModelSource) -> ModelConfig:
    """A :class:`ModelSource` as the model deployment's ``user_config``."""
    if source.model_dir is not None:
        return ModelConfig(model_dir=source.model_dir, judge_dir=source.judge_dir)
    return ModelConfig(model_uri=source.model_uri, tracking_uri=source.tracking_uri)


def bind(section: ServeSection, model: ModelConfig, valid_parquet: str | None = None,
         data_root: str | None = None) -> Application:
    """The application: the options of ``g2p serve config`` (``serving.serve_config``), ``model`` as user_config."""
    m = PhenotypeModel.options(**model_options(section), user_config=model.dump()).bind(section)
    return Ingress.options(ray_actor_options=INGRESS_OPTIONS["ray_actor_options"]).bind(
        m, section, valid_parquet, data_root)


def app(args: AppArgs) -> Application:
    """The application builder: ``serve run serving.ray_app:app model_uri=...``, or the ``import_path``
    of the config ``g2p serve config`` writes (its ``args`` carry the ``serve`` section)."""
    if not isinstance(args, AppArgs):  # called directly with a dict
        args = AppArgs.model_validate(args or {})
    section = args.section()
    return bind(section, args.model(section), args.records, args.data_root)


def __getattr__(name: str) -> Any:
    if name == "application":  # `serve build serving.ray_app:application` (built on first access)
        return app(AppArgs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_app(source: ModelSource, section: ServeSection = ServeSection(), valid_parquet: str | None = None,
              data_root: str | None = None) -> Application:
    """The bound application serving ``source`` (replicas, autoscaling and GPUs per replica from ``section``)."""
    return bind(section, model_config(source), valid_parquet, data_root)


def start(source: ModelSource, section: ServeSection = ServeSection(), *, host: str | None = None,
          port: int | None = None, valid_parquet: str | None = None, data_root: str | None = None,
          num_cpus: int | None = None, name: str = "g2p", route_prefix: str = "/") -> str:
    """In process (tests, benchmarks): start Ray (if needed), Serve on host:port, and the app with
    ``serve.run``; returns the base URL (non-blocking). ``g2p serve`` deploys the Serve config instead."""
    import ray

    host = host or section.host
    port = section.port if port is None else port
    if not ray.is_initialized():
        import os

        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(source, section, valid_parquet, data_root), name=name, route_prefix=route_prefix,
              blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def stop() -> None:
    serve.shutdown()
