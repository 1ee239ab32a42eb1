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
starting and stopping its own (about 14 s a stage). The repro runs in the
background from the session fixture ``real_data_repro``
(tests/integration/conftest.py), beside ``test_pipeline.py``'s when both are
selected; this test awaits it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from g2p.data.layout import TRUTH_RELPATH
from tests.fixtures import replicated_records
from tests.tiny_pipeline import TRAIN_STAGES, stage_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_repro_reaches_register_without_ground_truth(real_data_repro: tuple[Path, dict[str, str], object]) -> None:
    repo, env, job = real_data_repro  # started in the background (tests/integration/conftest.py)
    assert not (repo / "data" / TRUTH_RELPATH).exists()
    out = job.wait(timeout=800)
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
