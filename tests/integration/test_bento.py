"""BentoML service on loopback: real ``bentoml serve`` and ``bentoml build`` subprocesses, a tiny untrained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from serving.testing import free_port, tiny_model, wait_http

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
RNG = np.random.default_rng(1)
BARCODES = ["".join(RNG.choice(list("ACGT"), n)) for n in (600, 500)]


def call(url: str, body: object | bytes | None = None) -> tuple[int, object]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def detail(out: object) -> str:
    return json.dumps(out)


@contextmanager
def bento_server(target: str, env: dict[str, str], log: Path):
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/readyz", timeout=90)
        except TimeoutError:
            raise AssertionError(f"bentoml serve {target} did not get ready:\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bento")
    model = tiny_model(tmp / "model", seed=0)
    params = tmp / "params.yaml"
    params.write_text("serve:\n  max_n: 6\n  max_steps: 20\n  default_n: 2\n  default_steps: 2\n")
    env = {**os.environ, "G2P_MODEL_DIR": str(model), "G2P_PARAMS": str(params), "BENTOML_HOME": str(tmp / "home"),
           "BENTOML_DO_NOT_TRACK": "true"}
    return {"tmp": tmp, "model": model, "params": params, "env": env}


@pytest.fixture(scope="module")
def server(setup: dict):
    with bento_server("serving.bento_service:G2PPhenotypes", setup["env"], setup["tmp"] / "serve.log") as url:
        yield url


def test_phenotypes_are_the_pipelines_bytes(server, setup) -> None:
    """The response's PNGs are the pipeline's images, called directly with the request's barcode, place,
    knobs and a generator seeded with its seed."""
    import base64

    import torch

    from g2p.images import png_bytes
    from g2p.pipeline import images_uint8, load_pipeline

    req = {"barcode": BARCODES[0], "latitude": -12.5, "longitude": 130.0, "n": 3, "steps": 2, "seed": 9,
           "guidance_scale": 2.5, "aligner_guidance_scale": 0.5, "scheduler": "unipc"}
    code, out = call(server + "/v1/phenotypes", req)
    assert code == 200, out
    assert len(out["images"]) == 3 and out["model_version"].startswith("folder:") and out["scores"] is None
    assert (out["guidance_scale"], out["aligner_guidance_scale"], out["scheduler"]) == (2.5, 0.5, "unipc")
    pipe = load_pipeline(str(setup["model"])).with_scheduler("unipc")
    imgs = pipe(BARCODES[0], -12.5, 130.0, num_images_per_barcode=3, num_inference_steps=2, guidance_scale=2.5,
                aligner_guidance_scale=0.5, generator=torch.Generator().manual_seed(9), output_type="pt").images
    assert [base64.b64decode(s) for s in out["images"]] == [png_bytes(im) for im in images_uint8(imgs)]
    assert call(server + "/v1/phenotypes", {**req, "n": None})[1]["n"] == 2  # serve.default_n from G2P_PARAMS


def test_model_info_docs_and_vary(server) -> None:
    code, info = call(server + "/v1/model")
    assert code == 200 and info["limits"]["max_n"] == 6 and info["image_size"] == 32
    spec = call(server + "/docs.json")[1]
    props = spec["paths"]["/v1/phenotypes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    text = detail(props) + detail(spec.get("components", {}))
    for field in ("barcode", "seed", "aligner_guidance_scale", "scheduler", "timeout_s"):
        assert field in text
    assert '"maximum": 6' in text and '"minLength": 200' in text  # the shared model's bounds
    code, v = call(server + "/v1/vary", {"barcode": BARCODES[1], "rates": [0.3], "latitudes": [45.0], "steps": 1})
    assert code == 200 and len(v["mutation"]) == 1 and len(v["latitude"]) == 1


@pytest.mark.parametrize("body, text", [
    ({"barcode": "ACGTXQ" * 100}, "barcode='ACGTXQ"),
    ({"barcode": BARCODES[0], "latitude": 95.0, "longitude": 1.0}, "latitude=95.0"),
    ({"barcode": BARCODES[0], "n": 7}, "n=7"),
    ({"barcode": BARCODES[0], "steps": 0}, "steps=0"),
    ({"barcode": BARCODES[0], "guidance_scale": 99.0}, "guidance_scale=99.0"),
    ({"barcode": BARCODES[0], "cfg_scale": 3.0}, "cfg_scale=3.0"),
    (b'{"barcode": ', "malformed JSON"),
])
def test_bad_input_is_422_naming_field_and_value(server, body, text) -> None:
    code, out = call(server + "/v1/phenotypes", body)
    assert code == 422 and text in out["detail"], (code, out)  # the Ray Serve app's 422 body
    assert set(out) == {"detail", "errors"} and out["errors"][0]["field"] in text + " body"
    with urllib.request.urlopen(server + "/readyz") as r:
        assert r.status == 200  # still serving


def test_bad_sweep_and_timeout(server) -> None:
    code, out = call(server + "/v1/vary", {"barcode": BARCODES[1], "rates": []})
    assert code == 422 and out["errors"][0]["field"] == "rates", out
    code, out = call(server + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 6, "steps": 20, "timeout_s": 0.01})
    assert code == 504 and out["timeout_s"] == 0.01 and "timeout" in out["detail"], out
    with urllib.request.urlopen(server + "/readyz") as r:
        assert r.status == 200  # still serving


def test_bentoml_build_makes_a_bento_that_serves(setup) -> None:
    env = setup["env"]
    r = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("g2p_phenotypes:"), r.stdout
    src = Path(env["BENTOML_HOME"]) / "bentos" / "g2p_phenotypes" / tag.split(":")[1] / "src"
    assert (src / "serving" / "bento_service.py").exists() and (src / "g2p" / "pipeline.py").exists()
    assert not (src / "tests").exists() and not (src / "pipelines").exists()  # serving does not import pipelines/
    with bento_server(tag, env, setup["tmp"] / "bento.log") as url:
        code, out = call(url + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 1, "steps": 2})
        assert code == 200 and len(out["images"]) == 1
