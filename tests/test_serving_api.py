"""The HTTP contract without Ray: the OpenAPI document states every bound and status; refusals are documented 422s.

``serving.ray_app.make_api`` is the very app the Ray Serve ingress serves, here behind FastAPI's TestClient
with a stand-in for the model deployment.
"""

from __future__ import annotations

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from serving.config import ServeSection
from serving.ray_app import make_api
from serving.schema import BARCODE_PATTERN, PhenotypeRequest, VaryRequest, request_models

SECTION = ServeSection(max_n=6, max_steps=20, request_timeout_s=30, max_vary_rates=4)
BARCODE = "ACGT" * 150


class Echo:
    """Stands in for the ingress: answers what it was asked."""

    async def answer(self, method: str, payload: dict, timeout_s: float | None) -> JSONResponse:
        return JSONResponse({"method": method, "payload": payload, "timeout_s": timeout_s})


@pytest.fixture(scope="module")
def spec() -> dict:
    return make_api(SECTION).openapi()


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_api(SECTION, Echo()))


def schema(spec: dict, name: str) -> dict:
    return spec["components"]["schemas"][name]


def bounds(prop: dict) -> dict:
    """The non-null branch of an optional field (``anyOf: [{...}, {type: null}]``), or the field itself."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            return {**prop, **branch}
    return prop


def test_openapi_states_the_bounds_of_the_section(spec: dict) -> None:
    body = spec["paths"]["/v1/phenotypes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/PhenotypeRequest")
    p = schema(spec, "PhenotypeRequest")["properties"]
    assert set(p) == {"barcode", "latitude", "longitude", "n", "steps", "guidance_scale", "aligner_guidance_scale",
                      "scheduler", "seed", "timeout_s"}
    assert p["barcode"]["pattern"] == BARCODE_PATTERN and p["barcode"]["minLength"] == 200
    assert "200..660" in p["barcode"]["description"] and "10% of it may be N" in p["barcode"]["description"]
    assert (bounds(p["latitude"])["minimum"], bounds(p["latitude"])["maximum"]) == (-90, 90)
    assert (bounds(p["longitude"])["minimum"], bounds(p["longitude"])["maximum"]) == (-180, 180)
    assert (bounds(p["n"])["minimum"], bounds(p["n"])["maximum"]) == (1, 6)
    assert (bounds(p["steps"])["minimum"], bounds(p["steps"])["maximum"]) == (1, 20)
    for k in ("guidance_scale", "aligner_guidance_scale"):
        assert (bounds(p[k])["minimum"], bounds(p[k])["maximum"]) == (0, 50)
    assert (bounds(p["seed"])["minimum"], bounds(p["seed"])["maximum"]) == (0, 2**63 - 1)
    assert bounds(p["timeout_s"])["exclusiveMinimum"] == 0 and bounds(p["timeout_s"])["maximum"] == 30
    assert bounds(p["scheduler"])["enum"] == ["ddim", "ddpm", "dpmsolver++", "unipc", "euler"]
    v = schema(spec, "VaryRequest")["properties"]
    assert (v["rates"]["minItems"], v["rates"]["maxItems"]) == (1, 4)
    assert (v["rates"]["items"]["minimum"], v["rates"]["items"]["maximum"]) == (0, 1)
    assert (v["latitudes"]["minItems"], v["latitudes"]["maxItems"]) == (1, 7)
    assert (v["latitudes"]["items"]["minimum"], v["latitudes"]["items"]["maximum"]) == (-90, 90)
    assert v["rates"]["default"] == [0.0, 0.1, 0.2, 0.3]  # g2p.variation.MUTATION_RATES, cut to serve.max_vary_rates


def test_openapi_documents_every_status_with_its_body(spec: dict) -> None:
    for route in ("/v1/phenotypes", "/v1/vary"):
        r = spec["paths"][route]["post"]["responses"]
        assert {"200", "422", "500", "504"} <= set(r)
        assert r["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationErrorBody")
        assert r["504"]["content"]["application/json"]["schema"]["$ref"].endswith("/TimeoutBody")
        assert r["500"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "404" in spec["paths"]["/v1/records/{processid}/image"]["get"]["responses"]
    err = schema(spec, "FieldError")["properties"]
    assert set(err) == {"field", "value", "message"}


@pytest.mark.parametrize("route, body, field, value", [
    ("/v1/phenotypes", {"barcode": "ACGT" * 10}, "barcode", "ACGTACGT"),
    ("/v1/phenotypes", {"barcode": "ACGTXQ" * 100}, "barcode", "ACGTXQ"),
    ("/v1/phenotypes", {"barcode": "N" * 300}, "barcode", "N fraction"),
    ("/v1/phenotypes", {"barcode": BARCODE, "latitude": 91, "longitude": 0}, "latitude", "91"),
    ("/v1/phenotypes", {"barcode": BARCODE, "latitude": 10}, "longitude", "one coordinate"),
    ("/v1/phenotypes", {"barcode": BARCODE, "n": 7}, "n", "7"),
    ("/v1/phenotypes", {"barcode": BARCODE, "steps": 21}, "steps", "21"),
    ("/v1/phenotypes", {"barcode": BARCODE, "scheduler": "plms"}, "scheduler", "plms"),
    ("/v1/phenotypes", {"barcode": BARCODE, "timeout_s": 31}, "timeout_s", "31"),
    ("/v1/phenotypes", {"barcode": BARCODE, "cfg_scale": 3}, "cfg_scale", "3"),
    ("/v1/vary", {"barcode": BARCODE, "rates": []}, "rates", "[]"),
    ("/v1/vary", {"barcode": BARCODE, "latitudes": [0.0, 95.0]}, "latitudes.1", "95.0"),
    ("/v1/vary", {"barcode": BARCODE, "rates": [0.1] * 5}, "rates", "0.1"),
])
def test_a_refusal_is_a_documented_422_naming_field_and_value(client, spec, route, body, field, value) -> None:
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert "422" in spec["paths"][route]["post"]["responses"]
    out = r.json()
    assert set(out) == {"detail", "errors"} and out["errors"][0]["field"] == field, out
    assert field.split(".")[0] in out["detail"] and value in out["detail"], out["detail"]


def test_malformed_json_is_a_422_naming_the_body(client) -> None:
    r = client.post("/v1/phenotypes", content=b'{"barcode": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    assert "malformed JSON" in r.json()["detail"]


def test_a_valid_request_reaches_the_model_normalised_with_defaults(client) -> None:
    raw = "acgu-" * 150  # case, U and gaps are normalised
    r = client.post("/v1/phenotypes", json={"barcode": raw, "latitude": 1.5, "longitude": -2, "timeout_s": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == "predict" and out["timeout_s"] == 5
    assert out["payload"]["barcode"] == "ACGT" * 150 and out["payload"]["n"] == SECTION.default_n
    r = client.post("/v1/vary", json={"barcode": BARCODE})
    assert r.status_code == 200 and r.json()["payload"]["latitudes"] == [-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0]


def test_request_models_are_cached_per_section_and_parse_by_kind() -> None:
    assert request_models(SECTION) is request_models(ServeSection(max_n=6, max_steps=20, request_timeout_s=30,
                                                                  max_vary_rates=4))
    assert PhenotypeRequest.parse({"barcode": BARCODE, "n": 6}, SECTION).n == 6
    with pytest.raises(ValueError, match="less than or equal to 6"):
        PhenotypeRequest.parse({"barcode": BARCODE, "n": 7}, SECTION)
    assert VaryRequest.parse({"barcode": BARCODE}).rates == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
