"""``g2p predict`` on a real local Ray: every row out (bad ones with their error), the bytes of a call
alone, resume after a real interruption, and a URI output on a real S3 store (SeaweedFS on loopback)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests.s3store import S3Store
from tests.tiny_diffusion import tiny_config

pytestmark = pytest.mark.integration

CFG = tiny_config()
BAD = {  # row -> (column, value, what the error must name)
    3: ("barcode", "ACGTXQ", "barcode='ACGTXQ'"),
    11: ("latitude", 95.0, "latitude"),
    17: ("seed", -4.0, "seed: -4.0"),
    29: ("barcode", "ACGT" * 20, "length 80"),
}


def _barcode(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("ACGT"), size=int(rng.integers(300, 600))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from g2p.judge import Judge
    from g2p.model import G2PDiffusion
    from g2p.pipeline import G2PDiffusionPipeline

    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = G2PDiffusion(CFG)
    model.add_lora()
    G2PDiffusionPipeline.from_model(model).save_pretrained(tmp / "model")
    torch.manual_seed(1)
    Judge(CFG.judge).save_pretrained(tmp / "judge")
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"record_id": [f"r{i:03d}" for i in range(n)], "barcode": [_barcode(rng) for _ in range(n)],
                       "latitude": rng.uniform(-60, 60, n).round(3), "longitude": rng.uniform(-170, 170, n).round(3),
                       "seed": [float(i * 7) if i % 5 == 0 else np.nan for i in range(n)]})
    df.loc[8, ["latitude", "longitude"]] = np.nan  # an unknown place is fine
    for i, (col, value, _) in BAD.items():
        df.loc[i, col] = value
    df.to_parquet(tmp / "in.parquet")
    df.to_csv(tmp / "in.csv", index=False)
    (tmp / "params.yaml").write_text("predict:\n  rows_per_shard: 6\n  batch_size: 8\n  concurrency: 2\n")
    return {"tmp": tmp, "input": df}


@pytest.fixture(scope="module")
def ray_local():
    yield
    import ray

    ray.shutdown()


def _run(setup, out: str, **kw):
    from pipelines.predict import load_section, predict

    section = load_section(setup["tmp"] / "params.yaml")
    return predict(model=str(setup["tmp"] / "model"), judge=str(setup["tmp"] / "judge"),
                   input=str(setup["tmp"] / "in.parquet"), output=out, section=section, progress=False, **kw)


def test_interrupted_prediction_resumes_without_redoing_written_shards(setup, tmp_path: Path) -> None:
    """A real run killed (SIGINT) once half its files exist; the rerun writes only the others."""
    out = tmp_path / "out"
    (setup["tmp"] / "slow.yaml").write_text("predict:\n  rows_per_shard: 2\n  batch_size: 2\n  concurrency: 1\n")
    cmd = [sys.executable, "-m", "pipelines.cli", "predict", "--model", str(setup["tmp"] / "model"),
           "--input", str(setup["tmp"] / "in.csv"), "--output", str(out), "--steps", "2",
           "--params", str(setup["tmp"] / "slow.yaml"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    try:
        deadline = time.time() + 240
        while len(list(out.glob("part-*.parquet"))) < 10 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert 10 <= len(before) < 20, sorted(before)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    summary = json.loads(r.stdout)
    assert summary["shards"] == 20 and summary["shards_skipped"] == len(before)
    assert summary["shards_written"] == 20 - len(before)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert all(after[k] == v for k, v in before.items())  # untouched
    got = pd.read_parquet(out)
    assert len(got) == 40 and list(got["record_id"]) == list(setup["input"]["record_id"])
    assert not list(out.glob(".part-*.tmp-*"))


def test_every_row_out_bad_ones_with_their_error_and_images_as_a_call_alone(setup, ray_local, tmp_path) -> None:
    from g2p.judge import Judge
    from g2p.pipeline import images_uint8, load_pipeline

    out = tmp_path / "out"
    s = _run(setup, str(out), num_images=2, steps=3)
    df = setup["input"]
    assert s["rows"] == 40 and s["records"] == 80 and s["shards"] == 7 and s["shards_written"] == 7
    assert s["errors"] == 2 * len(BAD) and s["images"] == 80 - 2 * len(BAD)
    got = pd.read_parquet(out)
    assert len(got) == 80
    assert list(got["record_id"]) == [r for r in df["record_id"] for _ in range(2)]
    assert list(got["sample"]) == [0, 1] * 40
    for i, (_, _, named) in BAD.items():
        rows = got[got["record_id"] == f"r{i:03d}"]
        assert rows["image"].isna().all() and rows["score"].isna().all()
        assert all(named in e for e in rows["error"]), list(rows["error"])
    ok = got[got["error"].isna()]
    assert ok["image"].notna().all() and ok["score"].notna().all()
    assert set(got["steps"]) == {3} and set(got["model_version"]) == {s["model_version"]}
    # seeds: the row's own, else --seed (0) + the row's number
    assert got.loc[got["record_id"] == "r005", "seed"].tolist() == [35, 35]
    assert got.loc[got["record_id"] == "r007", "seed"].tolist() == [7, 7]
    # the same bytes as the pipeline called alone with the row's barcode, place and seed (actors: 1 thread)
    pipe = load_pipeline(str(setup["tmp"] / "model"))
    judge = Judge.from_pretrained(setup["tmp"] / "judge")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in (0, 5, 8, 22):
            r = df.iloc[i]
            place = (None, None) if np.isnan(r["latitude"]) else (r["latitude"], r["longitude"])
            seed = int(r["seed"]) if not np.isnan(r["seed"]) else i
            alone = images_uint8(pipe(r["barcode"], *place, num_images_per_barcode=2, num_inference_steps=3,
                                      generator=torch.Generator().manual_seed(seed), output_type="pt").images)
            mine = got[got["record_id"] == r["record_id"]]
            from PIL import Image

            for j in range(2):
                png = np.asarray(Image.open(io.BytesIO(mine["image"].iloc[j])))
                assert np.array_equal(png, alone[j].permute(1, 2, 0).numpy()), (i, j)
            score = judge.score(alone, [r["barcode"]] * 2)
            assert np.allclose(mine["score"].to_numpy(), score.numpy(), atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    # the same request again: nothing to do; another request at the same output: refused, naming what differs
    again = _run(setup, str(out), num_images=2, steps=3)
    assert again["shards_skipped"] == 7 and again["shards_written"] == 0 and again["errors"] == 2 * len(BAD)
    with pytest.raises(ValueError, match="another knobs"):
        _run(setup, str(out), num_images=2, steps=4)


def test_prediction_to_an_s3_uri(setup, ray_local, tmp_path_factory) -> None:
    import pyarrow.fs as pafs

    with S3Store(tmp_path_factory.mktemp("s3")) as s3:
        for k, v in s3.env().items():
            os.environ[k] = v  # pyarrow in the driver and in Ray's workers (started from this process)
        import ray

        ray.shutdown()  # workers started before the credentials were set would not see them
        uri = s3.uri("predictions/run1")
        s = _run(setup, uri, steps=2)
        assert s["records"] == 40 and s["errors"] == len(BAD) and s["shards_written"] == 7
        fs, path = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(path))
        names = sorted(i.base_name for i in infos if i.base_name.startswith("part-"))
        assert names == [f"part-{i:06d}.parquet" for i in range(7)]
        table = pq.read_table(path, filesystem=fs)
        assert table.num_rows == 40 and table.column("error").null_count == 40 - len(BAD)
        ray.shutdown()
