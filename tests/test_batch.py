"""Batch prediction's pure parts: row checks that name the field and the value, batching that keeps each
item's images those of a call alone, the predict section, the output table, CSV input streamed as text."""

from __future__ import annotations

import shlex

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from g2p.batch import Knobs, check_row, check_seed, generate_items, predict_rows
from g2p.config import ConfigError, SamplingConfig, preset
from g2p.model import G2PDiffusion
from g2p.pipeline import G2PDiffusionPipeline, images_uint8

A, B = "ACGT" * 100, "ACGGT" * 90


@pytest.fixture(scope="module")
def pipe() -> G2PDiffusionPipeline:
    torch.manual_seed(0)
    model = G2PDiffusion(preset("tiny"))
    model.add_lora()
    return G2PDiffusionPipeline.from_model(model)


@pytest.mark.parametrize("row, message", [
    (("ACGTXQ" * 50, None, None, None), "barcode='ACGTXQACGTXQ"),
    ((None, None, None, None), "barcode: expected a string, got None"),
    ((A, 91.0, 10.0, None), "latitude"),
    ((A, 10.0, None, None), "longitude"),
    ((A, "north", 3.0, None), "latitude"),
    ((A, None, None, -1), "seed: -1 must be"),
    ((A, None, None, 1.5), "seed: 1.5 must be"),
    ((A, None, None, "x"), "seed: 'x' must be"),
])
def test_check_row_names_the_field_and_the_value(row, message) -> None:
    with pytest.raises(ValueError) as e:
        check_row(*row, default_seed=0)
    assert message in str(e.value)


def test_check_row_normalises_and_fills_the_seed() -> None:
    assert check_row(A.lower(), "45.5", -75, None, default_seed=9) == (A, 45.5, -75.0, 9)
    assert check_row(A, float("nan"), float("nan"), 3.0, default_seed=9) == (A, None, None, 3)
    assert check_seed("", 4) == 4 and check_seed("12", 4) == 12 and check_seed(2**63 - 1, 0) == 2**63 - 1


def test_items_batched_together_are_the_images_of_calls_alone(pipe) -> None:
    knobs = Knobs(2, 2.0, 1.0, "ddim").resolved(pipe.cfg.sampling)
    p = pipe.with_scheduler("ddim")
    items = [(A, 10.0, 20.0, 2, 5), (B, None, None, 1, 6), (A, -30.0, 40.0, 3, 7)]
    for batch in (None, 1, 3):
        got = generate_items(p, items, knobs, batch_images=batch)
        for (seq, lat, lon, n, seed), im in zip(items, got):
            alone = p(seq, lat, lon, num_images_per_barcode=n, num_inference_steps=2, guidance_scale=2.0,
                      aligner_guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
                      output_type="pt").images
            assert torch.equal(im, images_uint8(alone)), (batch, seq[:8], seed)


def test_predict_rows_keeps_every_row_in_order(pipe) -> None:
    knobs = Knobs(1).resolved(pipe.cfg.sampling)
    rows = [{"barcode": A}, {"barcode": "AC"}, {"barcode": B, "latitude": 5.0, "longitude": 6.0, "seed": 11}]
    out = predict_rows(pipe.with_scheduler(knobs.scheduler), None, rows, knobs, 2, 4, [100, 101, 102])
    assert [(r["row"], r["sample"]) for r in out] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["seed"] for r in out] == [100, 100, 101, 101, 11, 11]
    assert out[2]["image"] is None and "barcode='AC'" in out[2]["error"] and out[0]["error"] is None
    assert out[0]["image"][:4] == b"\x89PNG" and out[0]["score"] is None  # no judge: no score
    with pytest.raises(ValueError, match="default_seeds"):
        predict_rows(pipe, None, rows, knobs, 1, 4, [0])


def test_knobs_take_the_models_defaults() -> None:
    s = SamplingConfig(scheduler="unipc", steps=10, guidance_scale=5.0, aligner_guidance_scale=4.0)
    assert Knobs(None, 1.0).resolved(s) == Knobs(10, 1.0, 4.0, "unipc")


def test_predict_section_is_strict_and_sizes_the_pool(tmp_path) -> None:
    from pipelines.predict import PredictSection, load_section

    assert PredictSection().actors({"CPU": 3.0}) == 2  # a local Ray counts one CPU beyond the cores
    assert PredictSection(num_gpus_per_actor=1.0).actors({"CPU": 64.0, "GPU": 8.0}) == 8
    assert PredictSection(concurrency=5).actors({"CPU": 3.0}) == 5
    with pytest.raises(ConfigError, match="predict.batch_size"):
        PredictSection(batch_size=0)
    p = tmp_path / "params.yaml"
    p.write_text("predict:\n  rows_per_shard: 7\n  typo: 1\n")
    with pytest.raises(ConfigError, match="predict"):
        load_section(p)
    p.write_text("predict:\n  rows_per_shard: 7\n")
    assert load_section(p).rows_per_shard == 7 and load_section(tmp_path / "absent.yaml") == PredictSection()


def test_output_table_repeats_rows_and_replaces_the_seed_column() -> None:
    from pipelines.predict import output_table

    t = pa.table({"id": ["a", "b"], "barcode": [A, "AC"], "seed": ["", "x"]})
    recs = [{"row": 0, "sample": j, "seed": 3, "image": b"png", "score": 0.5, "error": None} for j in range(2)]
    recs += [{"row": 1, "sample": j, "seed": None, "image": None, "score": None, "error": "seed: 'x'"}
             for j in range(2)]
    out = output_table(t, recs, 2, "seed", "folder:abc", Knobs(3, 2.0, 1.0, "ddim"))
    assert out.column("id").to_pylist() == ["a", "a", "b", "b"]
    assert out.column("seed").type == pa.int64() and out.column("seed").to_pylist() == [3, 3, None, None]
    assert out.column("error").null_count == 2 and out.column("steps").to_pylist() == [3] * 4
    assert out.schema.names == ["id", "barcode", "sample", "seed", "image", "score", "model_version", "steps",
                                "guidance_scale", "aligner_guidance_scale", "scheduler", "error"]


def test_csv_input_streams_as_text_in_order(tmp_path) -> None:
    import pyarrow.fs as pafs

    from pipelines.metadata_csv import text_csv_batches

    n = 30_000
    path = tmp_path / "in.csv"
    path.write_text("id,barcode,latitude\n" + "".join(f"r{i},{A},{'' if i % 3 else i % 90}\n" for i in range(n)))
    fs = pafs.LocalFileSystem()
    batches = list(text_csv_batches(lambda: fs.open_input_stream(str(path))))
    t = pa.Table.from_batches(batches)
    assert len(batches) > 1 and t.num_rows == n and t.schema.types == [pa.string()] * 3
    assert t.column("id").to_pylist()[-1] == f"r{n - 1}" and t.column("latitude").to_pylist()[:2] == ["0", None]


def test_mlproject_predict_entry_parses_with_the_cli() -> None:
    from pathlib import Path

    from pipelines.cli import build_parser

    entry = yaml.safe_load((Path(__file__).parents[1] / "mlproject" / "MLproject").read_text())["entry_points"]
    cmd = entry["predict"]["command"]
    params = {k: (v.get("default") or f"x_{k}") for k, v in entry["predict"]["parameters"].items()}
    argv = shlex.split(cmd.split("&&", 1)[1].format(**params))
    assert argv[0] == "g2p"
    a = build_parser().parse_args(argv[1:])
    assert a.model == "models:/g2pdiffusion@champion" and a.input == "x_input" and a.num_images == 1
    assert a.steps == 0 and a.func.__name__ == "cmd_predict"


def test_nearest_barcodes_chunked_equals_the_whole_comparison() -> None:
    from g2p.evaluation.metrics import kmer_profiles, nearest_barcodes

    rng = np.random.default_rng(0)
    base = ["".join(rng.choice(list("ACGT"), 300)) for _ in range(30)]
    ref = [b for b in base for _ in range(3)] + ["".join(rng.choice(list("ACGT"), 300)) for _ in range(80)]
    queries = base[:10] + ["".join(rng.choice(list("ACGT"), 300)) for _ in range(12)]
    d = np.abs(kmer_profiles(queries)[:, None] - kmer_profiles(ref)[None]).sum(2)
    for n in (1, 4):
        want = np.argsort(d, axis=1, kind="stable")[:, :n]
        assert np.array_equal(nearest_barcodes(queries, ref, n, chunk=17, query_chunk=5), want)
        streamed = (ref[i:i + 40] for i in range(0, len(ref), 40))  # chunks, as from shards
        assert np.array_equal(nearest_barcodes(queries, streamed, n), want)
    dd = d.copy()
    dd[dd == 0] = np.inf
    assert np.array_equal(nearest_barcodes(queries, ref, 2, exclude_self=True, chunk=9),
                          np.argsort(dd, axis=1, kind="stable")[:, :2])
    with pytest.raises(ValueError, match="n: 500"):
        nearest_barcodes(queries, ref, 500)


def test_row_registry_is_one_home() -> None:
    from g2p.evaluation.rows import (COMPARISONS, GENERATED, REFERENCE, REGISTRY, ROWS, Comparison, EvalRow,
                                     check_registry, row)

    assert ROWS[0] == REFERENCE and set(GENERATED) == {"no_aligner", "g2pdiffusion"}
    assert row("g2pdiffusion").aligner and not row("no_aligner").aligner
    with pytest.raises(ValueError, match="duplicate"):
        check_registry(REGISTRY + (REGISTRY[1],))
    with pytest.raises(ValueError, match="exactly one 'record' row"):
        check_registry(REGISTRY + (EvalRow("own_image_again", "record", "x"),))
    with pytest.raises(ValueError, match="row: 'nope'"):
        row("nope")
    assert {c.name for c in COMPARISONS} >= {"g2pdiffusion_vs_no_aligner", "g2pdiffusion_vs_nearest_neighbour",
                                             "g2pdiffusion_vs_random", "ground_truth_vs_random"}
    with pytest.raises(ValueError, match="comparisons: .'g2pdiffusion_vs_nope'"):
        check_registry(REGISTRY, COMPARISONS + (Comparison("g2pdiffusion", "nope", "?"),))
