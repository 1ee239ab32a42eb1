"""`dvc repro` through ``register`` on real BIOSCAN-5M records (issue 12: real data, end to end).

The data root is what a user gets: ``g2p data import-bioscan`` of a download
in the official layout. The download is built from the 25 real records
shipped in ``tests/data`` (:func:`tests.fixtures.replicated_records`): the
sample alone has 3 ``train`` records, 1 ``test`` and no ``val`` or unseen
splits, too few for the pipeline, so its 4 species-labelled records are copied
into every split under distinct processids (real barcodes, taxonomy and
places; species names with spaces; some coordinates blanked, as in real
records) and the images are placeholders. There is no synthetic ground truth:
the trait reader is skipped with its reason, ``evaluate`` and the report say
the truth-based metrics are absent and why, and ``register`` registers the
model and records the promotion decision. Real DVC, Ray and MLflow (sqlite),
tiny preset. The stages join one Ray started for the test (``ray start``, as a
cluster's head: ``RAY_ADDRESS``, code through the runtime env) rather than each
starting and stopping its own (about 14 s a stage); ``test_pipeline.py`` runs
the stages that start their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from g2p.data.layout import TRUTH_RELPATH
from tests.fixtures import build_root, replicated_records
from tests.raycluster import RayCluster
from tests.tiny_pipeline import TRAIN_STAGES, begin_pipeline_run, make_tiny_repo, run, stage_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("real_pipeline")
    download = build_root(base / "download", replicated_records())
    repo = base / "repo"
    repo.mkdir()

    def import_real(repo: Path, env: dict[str, str]) -> None:
        out = run("g2p", "data", "import-bioscan", "--root", str(download), "--out", "data",
                  "--mode", "copy", "--quiet", cwd=repo, env=env)
        summary = json.loads(out)
        assert summary["records_out"] == len(replicated_records()) and summary["images_missing"] == 0, summary

    # one Ray worker and 2 steps a stage: this test is about the data path (DDP: test_pipeline.py);
    # train_vae and train_base skipped (steps: 0, as the paper preset does): their input models go on, and
    # the real records still pass through encode_latents, train_diffusion, train_aligner and train_judge
    return repo, make_tiny_repo(repo, import_real, steps=2,
                                params={"ray": {"num_workers": 1}, "train_vae": {"steps": 0},
                                        "train_base": {"steps": 0}})


def test_repro_reaches_register_without_ground_truth(real_repo: tuple[Path, dict[str, str]],
                                                     tmp_path: Path) -> None:
    repo, env = real_repo
    assert not (repo / "data" / TRUTH_RELPATH).exists()
    env = begin_pipeline_run(repo, env)
    with RayCluster(tmp_path / "ray", num_nodes=1, cpus_per_node=3, object_store_mb=512) as cluster:
        out = run("dvc", "repro", cwd=repo, env={**env, **cluster.env()})
    assert "Running stage 'register'" in out, out

    # every record of the import passed validation (species with spaces, records without a place)
    summary = json.loads((repo / "outputs" / "validation" / "summary.json").read_text())
    assert summary["quarantined"] == 0, summary
    valid = pd.read_parquet(repo / "outputs" / "validation" / "valid.parquet")
    assert len(valid) == len(replicated_records()) and (~valid["has_place"]).sum() == 3

    # the trait reader was skipped, and says why
    reason = json.loads((repo / "models" / "trait_reader" / "ABSENT.json").read_text())["reason"]
    assert "no synthetic ground truth" in reason
    skipped = json.loads((repo / "metrics" / "train_trait_reader.json").read_text())
    assert skipped["skipped"] is True and skipped["reason"] == reason

    # evaluate: the tables are there, the truth-based metrics are absent with the reason
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {"seen", "unseen", "judge", "variation"} <= set(metrics)
    assert metrics["traits"] == {"absent": reason}
    assert metrics["variation"]["bergmann_truth"] is None and "bergmann_slope" not in metrics["variation"]
    assert metrics["seen"]["num_species"] == 2 and metrics["unseen"]["num_species"] == 2
    report = (repo / "reports" / "report.md").read_text()
    assert f"Not measured: {reason}" in report
    assert "Body size against latitude: not measured" in report

    # register: a version with alias challenger, the first becomes champion, the decision is recorded
    decision = json.loads((repo / "reports" / "promotion.json").read_text())
    assert decision["action"] == "first" and decision["promote"] is True, decision
    assert decision["registered"]["version"] == "1"
    # absent: the truth-based traits, and relative scores where the ground truth is not the ceiling
    assert decision["absent"]["traits"] == reason, decision
    assert all(k.startswith(("seen.relative_score", "unseen.relative_score")) and "not the ceiling" in v
               for k, v in decision["absent"].items() if k != "traits"), decision
    assert [c["metric"] for c in decision["checks"]] == ["seen.g2pdiffusion.success@2",
                                                         "unseen.g2pdiffusion.success@2"]
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("g2pdiffusion", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "first"
    assert champion.tags["absent.traits"] == reason
    assert f"not measured: traits ({reason})" in champion.description

    runs = stage_runs(env)
    assert set(runs) == {*TRAIN_STAGES, "evaluate", "register"}
    assert runs["train_trait_reader"].data.tags["g2p.skipped"] == reason
    for stage in ("train_vae", "train_base"):
        skipped = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert skipped["skipped"] is True and runs[stage].data.tags["g2p.skipped"] == skipped["reason"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
