"""Request and response models of the phenotype API (pydantic v2): one definition for every front.

The same request models are Ray Serve's typed FastAPI body, BentoML's
``input_spec`` and the rows the MLflow pyfunc (``pipelines/g2p_pyfunc.py``)
accepts, with the same field names everywhere::

    barcode, latitude, longitude, n, steps, guidance_scale (CFG),
    aligner_guidance_scale (the paper's w), scheduler, seed, timeout_s (HTTP)

Bounds come from the ``serve`` section, so the classes are built from it:
:func:`request_models` (cached per section) returns ``.phenotype`` and
``.vary``. Every rule the servers enforce is stated in the JSON schema (and so
in the OpenAPI document): numeric bounds as ``minimum``/``maximum``, list sizes
as ``minItems``/``maxItems``, the barcode alphabet as a ``pattern`` and its raw
length as ``minLength``; the rules a schema cannot state (length after
normalisation, share of ``N``, both coordinates or neither) are in the field
descriptions. The barcode rules are ``g2p.data.normalise``'s, so the endpoint
accepts exactly what the pipeline does. A broken rule is a 422 whose body
(:class:`ValidationErrorBody`) names the field and the value.
"""

import functools
import math
import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from g2p.pipeline import SCHEDULERS
from g2p.data.normalise import AMBIGUITY_CODES, MAX_NUCLEOTIDES, BarcodeRules, check_barcode, check_coordinates
from g2p.variation import LATITUDES, MUTATION_RATES
from serving.config import ServeSection

RULES = BarcodeRules()
MIN_NUCLEOTIDES = RULES.min_length
MAX_SCALE = 50.0
MAX_SEED = 2**63 - 1
SCHEDULER_NAMES = tuple(SCHEDULERS)
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]

# What check_barcode normalises: A C G T N, U (-> T), IUPAC ambiguity codes and ? (-> N), gap characters
# and whitespace (dropped), in either case. The ECMA-262 form goes to the schema; Python checks the same set.
_CHARS = "ACGTUN" + AMBIGUITY_CODES.replace("?", "")
_CLASS = _CHARS + _CHARS.lower() + r"?.~ \t\r\n-"
BARCODE_PATTERN = f"^[{_CLASS}]+$"
_BARCODE_RE = re.compile(f"[{_CLASS}]+")
BARCODE_DESCRIPTION = (
    f"COI DNA barcode. Accepted characters: A C G T N, U (read as T), the IUPAC ambiguity codes "
    f"{' '.join(AMBIGUITY_CODES)} (read as N), gap characters - . ~ and whitespace (dropped), in either case. "
    f"After that normalisation the barcode must be {MIN_NUCLEOTIDES}..{MAX_NUCLEOTIDES} nt long (longer reads "
    f"are trimmed to {MAX_NUCLEOTIDES} nt), and at most {RULES.max_n_fraction:.0%} of it may be N.")


def _check_barcode(v: str) -> str:
    """The schema's pattern, then ``check_barcode``'s rules; ``ValueError`` naming the field and the value."""
    if not _BARCODE_RE.fullmatch(v):
        bad = "".join(sorted({c for c in v if not _BARCODE_RE.fullmatch(c)}))
        shown = v if len(v) <= 40 else v[:37] + "..."
        raise ValueError(f"barcode={shown!r}: characters {bad!r} outside the accepted alphabet "
                         f"(ACGTUN, IUPAC codes, gaps - . ~ and whitespace)")
    return check_barcode(v, RULES, field="barcode")


def _barcode_field() -> Any:
    return Field(description=BARCODE_DESCRIPTION,
                 json_schema_extra={"pattern": BARCODE_PATTERN, "minLength": MIN_NUCLEOTIDES},
                 examples=["ACGT" * 150])


Scale = Annotated[float, Field(ge=0.0, le=MAX_SCALE, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Latitude = Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]

PLACE = "Give both latitude and longitude, or neither (an unknown place)."


class _Request(BaseModel):
    """What both request models share: the barcode rule, the place rule, ``parse``."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = ""

    @field_validator("barcode", check_fields=False)
    @classmethod
    def _barcode(cls, v: str) -> str:
        return _check_barcode(v)

    @model_validator(mode="after")
    def _place(self) -> Any:
        lat, lon = check_coordinates(self.latitude, self.longitude)  # "longitude: one coordinate present, ..."
        self.__dict__.update(latitude=lat, longitude=lon)
        return self

    @classmethod
    def parse(cls, data: Any, section: ServeSection | None = None) -> Any:
        """Validate ``data`` with the model of this kind built for ``section`` (default: the defaults)."""
        return getattr(request_models(section or ServeSection()), cls.kind).model_validate(data)


class RequestModels(NamedTuple):
    phenotype: type[BaseModel]
    vary: type[BaseModel]


@functools.lru_cache(maxsize=64)
def request_models(section: ServeSection = ServeSection()) -> RequestModels:
    """The request models bounded by ``section`` (``max_n``, ``max_steps``, ``request_timeout_s``,
    ``max_vary_rates``, ``default_n``); the same section gives the same classes."""
    max_rates = section.max_vary_rates
    max_lats = section.max_vary_rates + 3
    default_rates = list(MUTATION_RATES[:max_rates])
    default_lats = list(LATITUDES[:max_lats])
    steps_doc = (f"sampling steps, 1..{section.max_steps}; default: "
                 + (f"{section.default_steps}" if section.default_steps else "the model's sampling.steps"))
    sched_doc = f"sampling scheduler, one of {', '.join(SCHEDULER_NAMES)}; default: the model's sampling.scheduler"

    class PhenotypeRequest(_Request):
        """One barcode and place; knobs left out (or null) take the model's sampling defaults."""

        kind: ClassVar[str] = "phenotype"

        barcode: str = _barcode_field()
        latitude: Latitude | None = Field(None, description=f"degrees north, -90..90. {PLACE}")
        longitude: Longitude | None = Field(None, description=f"degrees east, -180..180. {PLACE}")
        n: Annotated[int, Field(ge=1, le=section.max_n)] | None = Field(
            section.default_n, description=f"number of images, 1..{section.max_n} (serve.max_n)")
        steps: Annotated[int, Field(ge=1, le=section.max_steps)] | None = Field(None, description=steps_doc)
        guidance_scale: Scale | None = Field(
            None, description="classifier-free guidance scale s (1 = off), 0..50; default: the model's")
        aligner_guidance_scale: Scale | None = Field(
            None, description="aligner guidance strength w of the paper (0 = off), 0..50; default: the model's")
        scheduler: SchedulerName | None = Field(None, description=sched_doc)
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(
            0, description="the images are those of torch.Generator().manual_seed(seed): same seed, same images")
        timeout_s: Annotated[float, Field(gt=0, le=section.request_timeout_s, allow_inf_nan=False)] | None = Field(
            None, description=f"give up after this many seconds (504), in (0, {section.request_timeout_s:g}] "
                              f"(serve.request_timeout_s, the default)")

    class VaryRequest(_Request):
        """Mutation and latitude sweeps of ``g2p vary`` (paper 4.4): one image per variant, all from one seed."""

        kind: ClassVar[str] = "vary"

        barcode: str = _barcode_field()
        latitude: Latitude | None = Field(None, description=f"degrees north, -90..90. {PLACE}")
        longitude: Longitude | None = Field(
            None, description=f"degrees east, -180..180 (the latitude sweep uses 0 when absent). {PLACE}")
        rates: list[Rate] = Field(
            default=list(default_rates), min_length=1, max_length=max_rates,
            description=f"mutation rates, each in 0..1, 1..{max_rates} of them (serve.max_vary_rates)")
        latitudes: list[Latitude] = Field(
            default=list(default_lats), min_length=1, max_length=max_lats,
            description=f"latitudes of the sweep, each in -90..90, 1..{max_lats} of them (serve.max_vary_rates + 3)")
        steps: Annotated[int, Field(ge=1, le=section.max_steps)] | None = Field(None, description=steps_doc)
        guidance_scale: Scale | None = Field(None, description="classifier-free guidance scale s (1 = off), 0..50")
        aligner_guidance_scale: Scale | None = Field(None, description="aligner guidance strength w (0 = off), 0..50")
        scheduler: SchedulerName | None = Field(None, description=sched_doc)
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(0, description="same seed, same images")

    return RequestModels(PhenotypeRequest, VaryRequest)


class PhenotypeRequest(_Request):
    """Parse with the section's model: ``PhenotypeRequest.parse(data, section)``."""

    kind: ClassVar[str] = "phenotype"


class VaryRequest(_Request):
    """Parse with the section's model: ``VaryRequest.parse(data, section)``."""

    kind: ClassVar[str] = "vary"


# ----------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------


class PhenotypeResponse(BaseModel):
    barcode: str = Field(description="the normalised barcode the images were generated for")
    latitude: float | None
    longitude: float | None
    n: int
    steps: int
    guidance_scale: float = Field(description="classifier-free guidance scale used")
    aligner_guidance_scale: float = Field(description="aligner guidance strength w used")
    scheduler: str
    seed: int
    images: list[str] = Field(description="base64-encoded PNGs, n of them")
    scores: list[float] | None = Field(
        description="judge score (cosine, CLIBDScore) of each image; null without a judge")
    model_version: str
    data_version: str
    elapsed_s: float
    batch_size: int = Field(1, description="requests answered by the same pipeline call")


class ModelInfo(BaseModel):
    model_version: str
    data_version: str
    source: str
    image_size: int
    has_judge: bool
    sampling: dict[str, Any]
    limits: dict[str, Any]
    extra: dict[str, Any] = {}


class MutationImage(BaseModel):
    rate: float
    barcode: str = Field(description="the mutated barcode")
    image: str = Field(description="base64 PNG")
    score: float | None


class LatitudeImage(BaseModel):
    latitude: float
    image: str = Field(description="base64 PNG")
    score: float | None


class VaryResponse(BaseModel):
    mutation: list[MutationImage]
    latitude: list[LatitudeImage]
    steps: int
    guidance_scale: float
    aligner_guidance_scale: float
    scheduler: str
    seed: int
    model_version: str
    data_version: str


class FieldError(BaseModel):
    field: str = Field(description="the field (dotted path; 'body' for the body as a whole)")
    value: Any = Field(None, description="the value given")
    message: str = Field(description="what is wrong, naming the field and the value")


class ValidationErrorBody(BaseModel):
    """422: the request breaks a rule of the request schema."""

    detail: str
    errors: list[FieldError]


class TimeoutBody(BaseModel):
    """504: the request ran past its timeout and was cancelled."""

    detail: str
    timeout_s: float
    elapsed_s: float


class ErrorBody(BaseModel):
    """404 / 500: what was not found, or what failed."""

    detail: str


# ----------------------------------------------------------------------------
# errors naming field and value
# ----------------------------------------------------------------------------


def error_details(err: Any) -> list[dict[str, Any]]:
    """A pydantic ``ValidationError``, FastAPI's ``RequestValidationError`` (or a ``ValueError``) as
    [{field, value, message}], each message naming both."""
    errors = err.errors() if hasattr(err, "errors") and callable(err.errors) else None
    if errors is None:
        return [{"field": _field_of(str(err)), "value": None, "message": str(err)}]
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if len(loc) > 1 and loc[0] == "body":
            loc = loc[1:]
        loc_s = ".".join(loc) or "body"
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        value = e.get("input")
        if e.get("type") == "json_invalid":
            body = getattr(err, "body", None)
            shown = body[:60] if isinstance(body, str) else ""
            loc_s, value = "body", shown
            msg = f"body={shown!r}: malformed JSON ({(e.get('ctx') or {}).get('error', msg)})"
        elif loc_s == "body" and ": " in msg and e.get("type") == "value_error":
            loc_s = _field_of(msg)  # a model-level rule (the place): "longitude: one coordinate present, ..."
            value = value.get(loc_s) if isinstance(value, dict) else value
        elif e.get("type") == "missing":
            msg = f"{loc_s}: field required"
            value = None
        elif not msg.startswith(loc_s.split(".")[0]):
            msg = f"{loc_s}={_shown(value)!r}: {msg}"
        out.append({"field": loc_s, "value": value if _jsonable(value) else repr(value), "message": msg})
    return out


def error_message(err: Any) -> str:
    return "; ".join(d["message"] for d in error_details(err))


def error_body(err: Any) -> dict[str, Any]:
    """The 422 body, :class:`ValidationErrorBody`."""
    details = error_details(err)
    return {"detail": "; ".join(d["message"] for d in details), "errors": details}


def _field_of(msg: str) -> str:
    head = re.match(r"([A-Za-z_][\w.\[\]]*)\s*[:=]", msg)
    return head.group(1) if head else "body"


def _shown(v: Any) -> Any:
    return v[:37] + "..." if isinstance(v, str) and len(v) > 40 else v


def _jsonable(v: Any) -> bool:
    if isinstance(v, list):
        return len(v) <= 64 and all(_jsonable(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and not math.isfinite(v))
