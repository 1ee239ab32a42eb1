"""Ray Serve endpoint on loopback: real local Ray (with its dashboard), the Serve config deployed through its
REST API as `g2p serve` does, real HTTP, a tiny untrained model (noise images, real code paths)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.config import ServeSection, load_serve_section, serve_section
from serving.testing import free_port, tiny_model, tiny_pipeline, tiny_records, wait_http
from tests.servers import restore_environ

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(0)
BARCODES = ["".join(RNG.choice(list("ACGT"), n)) for n in (600, 480, 620, 550)]


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds (a loaded machine is
    slow, so tests wait for conditions, never for fixed times)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def call(url: str, body: object | bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The application deployed as `g2p serve` does it: a local Ray with its dashboard, the Serve config of
    ``serving.serve_config`` PUT through the dashboard's REST API. It serves the folder model_a (training
    layout, converted at load); model_b (pipeline layout) is what a later user_config names."""
    import ray
    from ray import serve

    from serving.cli import start_ray
    from serving.serve_config import ModelConfig, deploy, serve_config

    tmp = tmp_path_factory.mktemp("serve")
    tiny_model(tmp / "model_a", seed=0)
    tiny_pipeline(tmp / "model_b", seed=1)
    valid = tiny_records(tmp / "data", BARCODES[:2])
    section = ServeSection(max_n=6, max_steps=20, default_n=2, default_steps=2, max_batch_size=8,
                           batch_wait_timeout_s=0.3, request_timeout_s=30, port=free_port())
    if ray.is_initialized():  # a Ray left by another module has no dashboard
        ray.shutdown()
    dashboard, env = start_ray(None, num_cpus=2)
    assert env == {}
    config = serve_config(section, model=ModelConfig(model_dir=str(tmp / "model_a")), records=str(valid),
                          data_root=str(tmp / "data"))
    deploy(dashboard, config)
    url = f"http://127.0.0.1:{section.port}"
    wait_http(url + "/healthz")
    yield {"url": url, "tmp": tmp, "dashboard": dashboard, "section": section}
    serve.shutdown()
    ray.shutdown()


def pngs(resp: dict) -> list[np.ndarray]:
    return [np.array(Image.open(io.BytesIO(base64.b64decode(s)))) for s in resp["images"]]


def test_health_model_info_and_openapi(server) -> None:
    url = server["url"]
    assert call(url + "/healthz")[1]["status"] == "ok"
    code, info = call(url + "/v1/model")
    assert code == 200 and info["model_version"].startswith("folder:") and info["limits"]["max_n"] == 6
    assert info["has_judge"] is False and info["image_size"] == 32
    spec = call(url + "/openapi.json")[1]
    assert "/v1/phenotypes" in spec["paths"] and "/v1/model" in spec["paths"]
    post = spec["paths"]["/v1/phenotypes"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    body = spec["components"]["schemas"][ref]
    fields = {"barcode", "latitude", "longitude", "n", "steps", "guidance_scale", "aligner_guidance_scale",
              "scheduler", "seed", "timeout_s"}
    assert fields == set(body["properties"])
    p = body["properties"]
    assert p["barcode"]["minLength"] == 200 and p["barcode"]["pattern"].startswith("^[ACGTUN")
    assert p["n"]["anyOf"][0]["maximum"] == 6 and p["steps"]["anyOf"][0]["maximum"] == 20  # the section's bounds
    assert (p["latitude"]["anyOf"][0]["minimum"], p["latitude"]["anyOf"][0]["maximum"]) == (-90, 90)
    assert (p["longitude"]["anyOf"][0]["minimum"], p["longitude"]["anyOf"][0]["maximum"]) == (-180, 180)
    assert p["timeout_s"]["anyOf"][0]["maximum"] == 30
    vary = spec["components"]["schemas"]["VaryRequest"]["properties"]
    assert vary["rates"]["maxItems"] == 6 and vary["latitudes"]["maxItems"] == 9 and vary["rates"]["minItems"] == 1
    for route in ("/v1/phenotypes", "/v1/vary"):
        assert {"200", "422", "500", "504"} <= set(spec["paths"][route]["post"]["responses"])
    assert "404" in spec["paths"]["/v1/records/{processid}/image"]["get"]["responses"]
    with urllib.request.urlopen(url + "/docs") as r:
        assert r.status == 200 and b"swagger" in r.read().lower()


def test_phenotypes_images_versions_and_same_seed_same_bytes(server) -> None:
    url = server["url"]
    req = {"barcode": BARCODES[0].lower(), "latitude": 45.5, "longitude": -73.6, "n": 3, "steps": 2, "seed": 11}
    code, a = call(url + "/v1/phenotypes", req)
    assert code == 200, a
    assert a["barcode"] == BARCODES[0]  # normalised
    assert len(a["images"]) == 3 and all(im.shape == (32, 32, 3) for im in pngs(a))
    assert a["scores"] is None and a["model_version"].startswith("folder:") and a["data_version"]
    assert (a["steps"], a["n"], a["seed"]) == (2, 3, 11)
    assert call(url + "/v1/phenotypes", req)[1]["images"] == a["images"]
    other = call(url + "/v1/phenotypes", {**req, "seed": 12})[1]
    assert other["images"] != a["images"]


def test_http_images_are_the_pipelines_bytes(server) -> None:
    """A request's PNGs are the pipeline's images, called directly with its barcode, place, knobs and seed."""
    import torch

    from g2p.images import png_bytes
    from g2p.pipeline import images_uint8, load_pipeline

    url = server["url"]
    req = {"barcode": BARCODES[1], "latitude": -33.0, "longitude": 151.0, "n": 2, "steps": 3, "seed": 2024,
           "guidance_scale": 2.0, "aligner_guidance_scale": 0.5}
    code, out = call(url + "/v1/phenotypes", req)
    assert code == 200, out
    pipe = load_pipeline(str(server["tmp"] / "model_a"))
    assert call(url + "/v1/model")[1]["extra"]["reloads"] == 0  # still model_a (the reload test comes later)
    imgs = pipe(BARCODES[1], -33.0, 151.0, num_images_per_barcode=2, num_inference_steps=3, guidance_scale=2.0,
                aligner_guidance_scale=0.5, generator=torch.Generator().manual_seed(2024), output_type="pt").images
    assert [base64.b64decode(s) for s in out["images"]] == [png_bytes(im) for im in images_uint8(imgs)]
    assert (out["guidance_scale"], out["aligner_guidance_scale"], out["scheduler"]) == (2.0, 0.5, "ddim")
    code, d = call(url + "/v1/phenotypes", {**req, "scheduler": "dpmsolver++"})
    assert code == 200 and d["scheduler"] == "dpmsolver++"
    imgs = pipe.with_scheduler("dpmsolver++")(
        BARCODES[1], -33.0, 151.0, num_images_per_barcode=2, num_inference_steps=3, guidance_scale=2.0,
        aligner_guidance_scale=0.5, generator=torch.Generator().manual_seed(2024), output_type="pt").images
    assert [base64.b64decode(s) for s in d["images"]] == [png_bytes(im) for im in images_uint8(imgs)]


def test_concurrent_requests_are_batched_and_keep_their_seeds(server) -> None:
    url = server["url"]
    reqs = [{"barcode": b, "latitude": 10.0 * i, "longitude": 5.0, "n": 1 + i % 3, "steps": 2, "seed": 100 + i}
            for i, b in enumerate(BARCODES)]
    alone = [call(url + "/v1/phenotypes", r)[1] for r in reqs]
    assert all(a["batch_size"] == 1 for a in alone)
    # concurrent rounds until one is batched: on a loaded machine the requests of a round may miss one
    # another's batch window, so a condition is waited for, not a time; every round's answers are checked
    batched = False
    for _ in range(10):
        with ThreadPoolExecutor(len(reqs)) as ex:
            together = list(ex.map(lambda r: call(url + "/v1/phenotypes", r), reqs))
        assert all(code == 200 for code, _ in together)
        for a, (_, t) in zip(alone, together):
            assert t["images"] == a["images"]  # bytewise: batching changes nothing
        if max(t["batch_size"] for _, t in together) > 1:  # they shared a sampler call
            batched = True
            break
    assert batched, "10 rounds of concurrent requests, none batched"


@pytest.mark.parametrize("body, field, value", [
    ({"barcode": "ACGTXQ" * 100}, "barcode", "ACGTXQ"),
    ({"barcode": "ACGT" * 10}, "barcode", "ACGTACGT"),
    ({"barcode": BARCODES[0], "latitude": 95.0, "longitude": 3.0}, "latitude", "95.0"),
    ({"barcode": BARCODES[0], "latitude": 5.0, "longitude": -181.0}, "longitude", "-181.0"),
    ({"barcode": BARCODES[0], "n": 7}, "n", "7"),
    ({"barcode": BARCODES[0], "steps": 21}, "steps", "21"),
    ({"barcode": BARCODES[0], "n": "many"}, "n", "many"),
    ({"barcode": BARCODES[0], "guidance_scale": -1}, "guidance_scale", "-1"),
    ({"barcode": BARCODES[0], "aligner_guidance_scale": 51}, "aligner_guidance_scale", "51"),
    ({"barcode": BARCODES[0], "scheduler": "plms"}, "scheduler", "plms"),
    ({"barcode": BARCODES[0], "cfg_scale": 3.0}, "cfg_scale", "3.0"),
    ({"barcode": BARCODES[0], "colour": "red"}, "colour", "red"),
    ({"latitude": 3.0, "longitude": 4.0}, "barcode", "required"),
    (b'{"barcode": "ACGT",', "body", "malformed JSON"),
])
def test_bad_input_is_422_naming_field_and_value(server, body, field, value) -> None:
    code, out = call(server["url"] + "/v1/phenotypes", body)
    assert code == 422, out
    assert field in out["detail"] and value in out["detail"], out["detail"]
    assert out["errors"][0]["field"] == field


@pytest.mark.parametrize("body, field", [
    ({"barcode": BARCODES[0], "rates": []}, "rates"),
    ({"barcode": BARCODES[0], "latitudes": []}, "latitudes"),
    ({"barcode": BARCODES[0], "rates": [0.1] * 7}, "rates"),
    ({"barcode": BARCODES[0], "latitudes": [91.0]}, "latitudes.0"),
])
def test_bad_sweeps_are_422_naming_the_field(server, body, field) -> None:
    code, out = call(server["url"] + "/v1/vary", body)
    assert code == 422 and out["errors"][0]["field"] == field and field.split(".")[0] in out["detail"], out


def test_timeout_is_a_clear_504_and_the_server_keeps_serving(server) -> None:
    url = server["url"]
    code, out = call(url + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 6, "steps": 20, "timeout_s": 0.01})
    assert code == 504 and "timeout" in out["detail"] and out["timeout_s"] == 0.01
    assert call(url + "/v1/phenotypes", {"barcode": BARCODES[1], "timeout_s": 31})[0] == 422  # above the config
    code, ok = call(url + "/v1/phenotypes", {"barcode": BARCODES[1], "n": 1, "steps": 2})
    assert code == 200 and len(ok["images"]) == 1
    assert call(url + "/healthz")[0] == 200


def test_records_vary_and_page(server) -> None:
    url = server["url"]
    recs = call(url + "/v1/records")[1]
    assert [r["processid"] for r in recs] == ["TEST000-26", "TEST001-26"] and all(r["has_image"] for r in recs)
    with urllib.request.urlopen(url + f"/v1/records/{recs[0]['processid']}/image") as r:
        assert Image.open(io.BytesIO(r.read())).size == (64, 64)
    assert call(url + "/v1/records/NOPE/image")[0] == 404
    code, v = call(url + "/v1/vary", {"barcode": recs[0]["barcode"], "latitude": 1.0, "longitude": 2.0,
                                      "rates": [0.0, 0.2], "latitudes": [-40.0, 0.0, 40.0], "steps": 2})
    assert code == 200 and len(v["mutation"]) == 2 and len(v["latitude"]) == 3
    assert v["mutation"][0]["barcode"] == recs[0]["barcode"] and v["mutation"][1]["barcode"] != recs[0]["barcode"]
    with urllib.request.urlopen(url + "/") as r:
        assert b"G2PDiffusion" in r.read()


def test_a_new_model_reaches_the_replicas_through_user_config_without_dropping_requests(server) -> None:
    """Redeploy the config with a new user_config while clients keep calling: Serve reconfigures the live
    replica in place; every call answers; the version changes; `serve config` shows the new user_config."""
    from serving.serve_config import MODEL_DEPLOYMENT, deployed, push_model

    url, tmp, dashboard = server["url"], server["tmp"], server["dashboard"]
    req = {"barcode": BARCODES[2], "n": 1, "steps": 2, "seed": 5}
    before = call(url + "/v1/phenotypes", req)[1]
    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            results.append(call(url + "/v1/phenotypes", req))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 2, 120, "the clients' first answers")  # calls in flight before the swap
    new = push_model(dashboard, "g2p", model_dir=str(tmp / "model_b"))  # returns once the replica reconfigured
    assert new.dump() == {"model_dir": str(tmp / "model_b")}
    wait_for(lambda: any(r[1].get("model_version") != before["model_version"] for r in list(results)), 300,
             "an answer from the new model")
    stop.set()
    for t in threads:
        t.join()
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:2]
    versions = [r["model_version"] for _, r in results]
    assert versions[0] == before["model_version"] and versions[-1] != before["model_version"]
    after = call(url + "/v1/phenotypes", req)[1]
    assert after["model_version"] == versions[-1] and after["images"] != before["images"]
    info = call(url + "/v1/model")[1]
    assert info["extra"]["reloads"] == 1 and info["extra"]["user_config"] == new.dump()
    app = next(a for a in deployed(dashboard)["applications"] if a["name"] == "g2p")
    assert next(d for d in app["deployments"] if d["name"] == MODEL_DEPLOYMENT)["user_config"] == new.dump()
    # the same user_config again: nothing to load, the replica keeps its model
    push_model(dashboard, "g2p", model_dir=str(tmp / "model_b"))
    assert call(url + "/v1/model")[1]["extra"]["reloads"] == 1


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A throwaway repository with two registered versions (tiny generator + tiny judge); v1 is champion."""
    import subprocess

    import torch

    from g2p.config import JudgeConfig, preset
    from g2p.judge import Judge
    from g2p.model import G2PDiffusion
    from pipelines import registry
    from pipelines.registry import PromoteSection, RegisterSection

    root = tmp_path_factory.mktemp("repo")
    store = f"sqlite:///{root / 'mlflow.db'}"
    cfg = preset("tiny")
    Judge(JudgeConfig(image_size=16, channels=(4, 8), embed_dim=8, dna_hidden_size=8, dna_heads=2,
                      dna_intermediate_size=16)).save_pretrained(root / "models" / "judge")
    (root / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  nfiles: 7\n  path: data\n")
    (root / "params.yaml").write_text("register:\n  model_name: g2pdiffusion\n")
    (root / "reports").mkdir()
    (root / "reports" / "metrics.json").write_text(json.dumps({
        "seen": {"g2pdiffusion": {"success@10": 0.5, "success@10_low": 0.4, "success@10_high": 0.6}},
        "unseen": {"g2pdiffusion": {"success@10": 0.2, "success@10_low": 0.1, "success@10_high": 0.3}},
        "eval_config_hash": "eval-a"}))
    for cmd in (["init", "-q"], ["add", "data.dvc", "params.yaml"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, capture_output=True)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "G2P_PIPELINE_RUN_ID", "G2P_USER")}
    os.environ.update({"MLFLOW_TRACKING_URI": store, "G2P_USER": "tester"})
    os.environ.pop("G2P_PIPELINE_RUN_ID", None)
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = G2PDiffusion(cfg)
            model.negative_bank = torch.randn(cfg.sampling.negative_bank_size, cfg.conditioner.hidden_size)
            model.save_pretrained(root / "models" / "g2pdiffusion")
            registry.register(RegisterSection(), PromoteSection(), root=root, progress=False)
        registry.promote("g2pdiffusion", PromoteSection(), to_version="1", note="serving test", tracking_uri=store)
    finally:
        restore_environ(saved)
    return {"store": store}


def test_registry_champion_is_served_and_a_promotion_reaches_the_replicas(server, registry_store) -> None:
    """The production path: models:/g2pdiffusion@champion. Moving the alias alone changes nothing (no
    polling); the promotion hook pins the new version in user_config, and no request is dropped."""
    from ray import serve

    from pipelines import registry
    from pipelines.promotion import notify_serving
    from pipelines.registry import PromoteSection
    from serving.serve_config import ModelConfig, deploy_beside, serve_config

    store, dashboard = registry_store["store"], server["dashboard"]
    section = dataclasses.replace(server["section"], default_n=2, default_steps=2, batch_wait_timeout_s=0.01)
    model = ModelConfig(model_uri="models:/g2pdiffusion@champion", tracking_uri=store)
    deploy_beside(dashboard, serve_config(section, model=model, app_name="registry", route_prefix="/reg"))
    url = server["url"] + "/reg"
    try:
        wait_http(url + "/healthz", timeout=120)
        info = call(url + "/v1/model")[1]
        assert (info["model_version"], info["data_version"], info["has_judge"]) == ("1", "0123abcd.dir", True)
        req = {"barcode": BARCODES[3], "latitude": 20.0, "longitude": 30.0, "seed": 3}
        code, v1 = call(url + "/v1/phenotypes", req)
        assert code == 200 and v1["model_version"] == "1" and v1["data_version"] == "0123abcd.dir"
        assert len(v1["scores"]) == 2 and all(-1.0 <= s <= 1.0 for s in v1["scores"])  # the bundled judge

        results: list[tuple[int, dict]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                results.append(call(url + "/v1/phenotypes", req))

        t = threading.Thread(target=client)
        t.start()
        wait_for(lambda: len(results) >= 1, 120, "the client's first answer")  # calls in flight before the swap
        d = registry.promote("g2pdiffusion", PromoteSection(), to_version="2", note="serving test",
                             tracking_uri=store)
        assert call(url + "/v1/model")[1]["model_version"] == "1"  # the alias moved; nothing polls it
        assert notify_serving(d, None, app="registry") is None  # no address given, none in the environment
        said = notify_serving(d, dashboard, app="registry")
        assert said and "version 2" in said, said
        wait_for(lambda: any(r[1].get("model_version") == "2" for r in list(results)), 300,
                 "an answer from version 2")
        stop.set()
        t.join()
        assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:2]
        versions = [r[1]["model_version"] for r in results]
        assert versions[0] == "1" and "2" in versions, versions
        v2 = call(url + "/v1/phenotypes", req)[1]
        assert v2["model_version"] == "2" and v2["images"] != v1["images"]
        assert call(url + "/v1/model")[1]["extra"]["user_config"]["version"] == "2"
    finally:
        serve.delete("registry")


def test_serve_section_is_strict_and_read_from_params_yaml(tmp_path: Path) -> None:
    from g2p.config import ConfigError

    assert serve_section(None) == ServeSection()
    with pytest.raises(ConfigError, match=r"serve\.max_n"):
        serve_section({"max_n": 0})
    with pytest.raises(ConfigError, match=r"serve\.colour"):
        serve_section({"colour": 1})
    p = tmp_path / "params.yaml"
    p.write_text("serve:\n  max_batch_size: 1\n  num_gpus: 0.5\n")
    assert load_serve_section(p) == ServeSection(max_batch_size=1, num_gpus=0.5)


def test_replicas_autoscaling_and_gpus_come_from_the_section() -> None:
    from serving.ray_app import PhenotypeModel, model_options

    fixed = model_options(ServeSection(num_replicas=3, num_cpus=2, num_gpus=0.5, max_batch_size=16))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert fixed["max_ongoing_requests"] >= 16 and "autoscaling_config" not in fixed
    auto = model_options(ServeSection(autoscaling=True, min_replicas=1, max_replicas=4, target_ongoing_requests=2))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert "num_replicas" not in auto
    d = PhenotypeModel.options(**fixed)  # Ray accepts them
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 0.5
