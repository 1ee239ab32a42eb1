"""Request and response models of the phenotype API (pydantic v2).

Validation reuses the model's own rules (``check_barcode``,
``check_coordinates``), so the endpoint accepts exactly what ``Generator``
does; ``n`` and ``steps`` are bounded by the ``serve`` section. A rule broken
raises ``ValueError`` naming the field and the value, which FastAPI and
BentoML turn into a 422.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from g2p.data.normalise import check_barcode, check_coordinates
from serving.config import ServeSection


class PhenotypeRequest(BaseModel):
    """One barcode and place; ``None`` knobs take the model's sampling defaults.

    Bounds of ``n`` and ``steps`` come from the validation context
    ``{"serve": ServeSection}`` (``PhenotypeRequest.parse(data, section)``);
    without one, the section's defaults apply.
    """

    model_config = ConfigDict(extra="forbid")

    barcode: str = Field(description="COI barcode (A/C/G/T/N; gaps and case are normalised)")
    latitude: float | None = Field(None, description="degrees, -90..90; omit both for an unknown place")
    longitude: float | None = Field(None, description="degrees, -180..180")
    n: int | None = Field(None, description="number of images (1..serve.max_n)")
    steps: int | None = Field(None, description="sampling steps (1..serve.max_steps)")
    guidance_scale: float | None = Field(None, description="aligner guidance w (0 = off), 0..50")
    cfg_scale: float | None = Field(None, description="classifier-free guidance (1 = off), 0..50")
    seed: int = Field(0, description="same seed, same images")
    timeout_s: float | None = Field(None, description="give up after this many seconds (<= serve.request_timeout_s)")

    @field_validator("barcode")
    @classmethod
    def _barcode(cls, v: str) -> str:
        return check_barcode(v, field="barcode")

    @field_validator("n", "steps")
    @classmethod
    def _bounded_int(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        sec = _section(info)
        hi = sec.max_n if info.field_name == "n" else sec.max_steps
        if not 1 <= v <= hi:
            raise ValueError(f"{info.field_name}={v!r}: must be between 1 and {hi} (serve.max_{info.field_name})")
        return v

    @field_validator("guidance_scale", "cfg_scale")
    @classmethod
    def _scale(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not (math.isfinite(v) and 0.0 <= v <= 50.0):
            raise ValueError(f"{info.field_name}={v!r}: must be a number between 0 and 50")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**63:
            raise ValueError(f"seed={v!r}: must be between 0 and 2**63 - 1")
        return v

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, v: float | None, info: ValidationInfo) -> float | None:
        hi = _section(info).request_timeout_s
        if v is not None and not (math.isfinite(v) and 0 < v <= hi):
            raise ValueError(f"timeout_s={v!r}: must be in (0, {hi}] (serve.request_timeout_s)")
        return v

    @model_validator(mode="after")
    def _place(self) -> "PhenotypeRequest":
        try:
            lat, lon = check_coordinates(self.latitude, self.longitude)
        except ValueError as e:  # "latitude: 95.0 outside [-90, 90]"
            raise ValueError(str(e)) from None
        self.latitude, self.longitude = lat, lon
        return self

    @classmethod
    def parse(cls, data: Any, section: ServeSection | None = None) -> "PhenotypeRequest":
        return cls.model_validate(data, context={"serve": section or ServeSection()})


def _section(info: ValidationInfo) -> ServeSection:
    ctx = info.context or {}
    return ctx.get("serve") or ServeSection()


class PhenotypeResponse(BaseModel):
    barcode: str = Field(description="the normalised barcode the images were generated for")
    latitude: float | None
    longitude: float | None
    n: int
    steps: int
    guidance_scale: float
    cfg_scale: float
    seed: int
    images: list[str] = Field(description="base64-encoded PNGs, n of them")
    scores: list[float] | None = Field(
        description="judge score (cosine, CLIBDScore) of each image; null without a judge")
    model_version: str
    data_version: str
    elapsed_s: float


class ModelInfo(BaseModel):
    model_version: str
    data_version: str
    source: str
    image_size: int
    has_judge: bool
    sampling: dict[str, Any]
    limits: dict[str, Any]
    extra: dict[str, Any] = {}


class VaryRequest(BaseModel):
    """Mutation and latitude sweeps of ``g2p vary`` (paper 4.4): one image per variant."""

    model_config = ConfigDict(extra="forbid")

    barcode: str
    latitude: float | None = None
    longitude: float | None = None
    rates: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5])
    latitudes: list[float] = Field(default_factory=lambda: [-60.0, -30.0, 0.0, 30.0, 60.0])
    steps: int | None = None
    guidance_scale: float | None = None
    cfg_scale: float | None = None
    seed: int = 0

    @field_validator("barcode")
    @classmethod
    def _barcode(cls, v: str) -> str:
        return check_barcode(v, field="barcode")

    @field_validator("rates", "latitudes")
    @classmethod
    def _lists(cls, v: list[float], info: ValidationInfo) -> list[float]:
        hi = _section(info).max_vary_rates + (3 if info.field_name == "latitudes" else 0)
        if not 1 <= len(v) <= hi:
            raise ValueError(f"{info.field_name}: {len(v)} values, must be 1..{hi}")
        lo_hi = (0.0, 1.0) if info.field_name == "rates" else (-90.0, 90.0)
        for x in v:
            if not (math.isfinite(x) and lo_hi[0] <= x <= lo_hi[1]):
                raise ValueError(f"{info.field_name}: {x!r} outside [{lo_hi[0]}, {lo_hi[1]}]")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        hi = _section(info).max_steps
        if v is not None and not 1 <= v <= hi:
            raise ValueError(f"steps={v!r}: must be between 1 and {hi} (serve.max_steps)")
        return v

    @model_validator(mode="after")
    def _place(self) -> "VaryRequest":
        self.latitude, self.longitude = check_coordinates(self.latitude, self.longitude)
        return self

    @classmethod
    def parse(cls, data: Any, section: ServeSection | None = None) -> "VaryRequest":
        return cls.model_validate(data, context={"serve": section or ServeSection()})


class VaryResponse(BaseModel):
    mutation: list[dict[str, Any]] = Field(description="[{rate, barcode, image, score}]")
    latitude: list[dict[str, Any]] = Field(description="[{latitude, image, score}]")
    model_version: str
    data_version: str


def error_details(err: Exception) -> list[dict[str, Any]]:
    """A pydantic ``ValidationError`` (or ``ValueError``) as [{field, value, message}], each naming both."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return [{"field": "body", "value": None, "message": str(err)}]
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ())) or "body"
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        value = e.get("input")
        if loc == "body" and ": " in msg:  # a model-level rule (the place): "latitude: 95.0 outside ..."
            loc = msg.split(": ", 1)[0]
        if e.get("type") == "missing":
            msg = f"{loc}: field required"
        elif loc != "body" and not msg.startswith(loc.split(".")[-1]) and not msg.startswith(loc):
            shown = value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "..."
            msg = f"{loc}={shown!r}: {msg}"
        out.append({"field": loc, "value": value if _jsonable(value) else repr(value), "message": msg})
    return out


def error_message(err: Exception) -> str:
    return "; ".join(d["message"] for d in error_details(err))


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))
