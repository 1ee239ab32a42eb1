"""BentoML service on loopback: real ``bentoml serve`` and ``bentoml build`` subprocesses, a tiny untrained model.

No fixed sleeps or wall-clock asserts: servers are awaited by polling (generous limits, for a loaded 2-core
box), and batching is awaited as a condition (rounds of concurrent requests until one batch holds several).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from serving.testing import free_port, tiny_model, wait_http

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
REQUEST_TIMEOUT_S = 600  # serve.request_timeout_s of the test server: a loaded box is slow, never a 504 here
RNG = np.random.default_rng(1)
BARCODES = ["".join(RNG.choice(list("ACGT"), n)) for n in (600, 500)]


def call(url: str, body: object | bytes | None = None) -> tuple[int, object]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S + 60) as r:
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
        try:  # two processes (front + generator) import torch: minutes on a loaded box, not seconds
            wait_http(url + "/readyz", timeout=600, proc=proc, log=log)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"bentoml serve {target} did not get ready: {e}\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``bentoml serve`` and wait for its graceful stop (a batch may still be running), then SIGKILL
    it and what is left of the workers it started, by pid (each worker runs in a session of its own, so
    neither a process-group signal nor the arbiter's death reaches it)."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    for w in alive:
        w.kill()
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bento")
    model = tiny_model(tmp / "model", seed=0)
    params = tmp / "params.yaml"
    params.write_text("serve:\n  max_n: 6\n  max_steps: 20\n  default_n: 2\n  default_steps: 2\n  max_batch_size: 8\n"
                      f"  request_timeout_s: {REQUEST_TIMEOUT_S}\n")
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
    batching = info["extra"]["batching"]
    assert batching["batchable"] is True and batching["max_batch_size"] == 8  # serve.max_batch_size
    spec = call(server + "/docs.json")[1]
    props = spec["paths"]["/v1/phenotypes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    text = detail(props) + detail(spec.get("components", {}))
    for field in ("barcode", "seed", "aligner_guidance_scale", "scheduler", "timeout_s"):
        assert field in text
    assert '"maximum": 6' in text and '"minLength": 200' in text  # the shared model's bounds
    code, v = call(server + "/v1/vary", {"barcode": BARCODES[1], "rates": [0.3], "latitudes": [45.0], "steps": 1})
    assert code == 200 and len(v["mutation"]) == 1 and len(v["latitude"]) == 1


def batches(url: str) -> dict[int, int]:
    """The generator's predict_batch calls so far, by the number of requests each answered."""
    code, info = call(url + "/v1/model")
    assert code == 200, info
    return {int(k): v for k, v in info["extra"]["batching"]["batches"].items()}


def test_concurrent_requests_are_batched_and_keep_their_images(server) -> None:
    """Requests in flight together are answered by one ``predict_batch`` call (the generator's batchable API),
    and each gets exactly the PNGs it gets alone: same seed, same image, whatever the batch."""
    places = [(-12.5, 130.0), (48.0, 11.0), (None, None), (5.8, -55.2)]
    reqs = [{"barcode": BARCODES[i % 2], "latitude": lat, "longitude": lon, "n": 1 + i % 2, "steps": 2,
             "scheduler": "ddpm", "seed": 100 + i} for i, (lat, lon) in enumerate(places)]  # ddpm: per-step noise
    alone = []
    for r in reqs:
        code, out = call(server + "/v1/phenotypes", r)
        assert code == 200 and out["batch_size"] == 1, out  # nothing else in flight
        alone.append(out["images"])
    assert len(set(map(tuple, alone))) == len(reqs)  # the seeds and places do differ
    before = batches(server)
    # Batching is a condition, not a timing: the dispatcher gathers what arrives while a batch runs. Send the
    # requests together until a round has been batched (nearly always the first), every answer checked.
    deadline, seen = time.monotonic() + 900, []
    while True:
        with ThreadPoolExecutor(len(reqs)) as pool:
            outs = list(pool.map(lambda r: call(server + "/v1/phenotypes", r), reqs))
        for r, (code, out), images in zip(reqs, outs, alone):
            assert code == 200, out
            assert out["images"] == images, f"seed {r['seed']}: batched images differ from those it got alone"
        seen.append([out["batch_size"] for _, out in outs])
        if max(seen[-1]) > 1:
            break
        assert time.monotonic() < deadline, f"no round of {len(reqs)} concurrent requests was batched: {seen}"
    after = batches(server)
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) > before.get(k, 0)}
    assert any(k > 1 for k in grown), (before, after)  # the generator's own count agrees
    assert sum(k * v for k, v in grown.items()) == len(reqs) * len(seen)  # every request, in some call


def test_max_batch_size_1_turns_batching_off(setup, tmp_path: Path) -> None:
    """serve.max_batch_size: 1 (Ray Serve's "unbatched") makes the generator's API a plain one."""
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  max_batch_size: 1\n")
    code = "import serving.bento_service as b; print(b.BATCHED, b.G2PGenerator.apis['generate'].batchable)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**setup["env"], "G2P_PARAMS": str(params)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["False", "False"], r.stdout


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
    # 1 ms cannot cover two processes and 20 sampling steps; one image, not six: the generator finishes what
    # it started (a 504 ends the wait, not the batch), and six images held a loaded box for minutes
    code, out = call(server + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 1, "steps": 20, "timeout_s": 0.001})
    assert code == 504 and out["timeout_s"] == 0.001 and "timeout" in out["detail"], out
    with urllib.request.urlopen(server + "/readyz") as r:
        assert r.status == 200  # still serving


def test_bento_requirements_are_the_tested_pins() -> None:
    """serving/bento-requirements.txt is a fresh lock: the .in file's closure pinned from constraints.txt."""
    from serving.bento_requirements import OUT_FILE, lock

    assert OUT_FILE.read_text() == lock(), "stale: run python -m serving.bento_requirements"


def pins(text: str) -> dict[str, str]:
    """Requirement lines (comments and blanks skipped) -> {name: version}; every line must be name==version."""
    from packaging.utils import canonicalize_name

    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert "==" in line and not any(c in line for c in "<>~;@"), f"not an exact pin: {line!r}"
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


@pytest.mark.timeout(1800)  # a build, then a second server's start: on a box at load 60, 6 min was measured
def test_bentoml_build_pins_versions_and_serves(setup) -> None:
    """``bentoml build`` (into a temporary BENTOML_HOME): the Bento installs exact versions, those of
    constraints.txt (torch: the installed one), and it serves."""
    from importlib import metadata

    from packaging.version import Version

    env = setup["env"]
    r = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("g2p_phenotypes:"), r.stdout
    bento = Path(env["BENTOML_HOME"]) / "bentos" / "g2p_phenotypes" / tag.split(":")[1]
    src = bento / "src"
    assert (src / "serving" / "bento_service.py").exists() and (src / "g2p" / "pipeline.py").exists()
    assert not (src / "tests").exists() and not (src / "pipelines").exists()  # serving does not import pipelines/
    built = pins((bento / "env" / "python" / "requirements.txt").read_text())
    tested = pins((ROOT / "constraints.txt").read_text())
    assert built["torch"] == Version(metadata.version("torch")).public
    assert built["bentoml"] == tested["bentoml"] == metadata.version("bentoml")  # added by bentoml build
    for name in ("diffusers", "transformers", "peft", "mlflow", "fastapi", "pydantic", "numpy", "starlette"):
        assert built[name] == tested[name], name  # direct and transitive alike
    off = {n: (v, tested[n]) for n, v in built.items() if n in tested and v != tested[n]}
    assert not off, f"pins that differ from constraints.txt: {off}"
    assert set(built) - set(tested) <= {"torch", "setuptools"}, set(built) - set(tested)
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()  # our pins, not a re-resolution
    with bento_server(tag, env, setup["tmp"] / "bento.log") as url:
        code, out = call(url + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 1, "steps": 2})
        assert code == 200 and len(out["images"]) == 1
