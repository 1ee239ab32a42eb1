"""Fixtures shared by integration modules.

``real_data_repro`` (session scope): the real-data ``dvc repro`` of
``test_real_data_pipeline.py``, started in the background. ``test_pipeline.py``
asks for it before its own repro when that test is selected too, so the two
repros run side by side (each stage is mostly process start-up: ~0.6 of a core);
the real-data test awaits it and checks what it left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import build_root, replicated_records
from tests.tiny_pipeline import BackgroundRepro, begin_pipeline_run, make_tiny_repo, run

REAL_DATA_TEST = "test_real_data_pipeline.py"


@pytest.fixture(scope="session")
def real_data_repro(tmp_path_factory: pytest.TempPathFactory):
    """(repo, env, job): a tiny repository of real BIOSCAN-5M records and its running ``dvc repro``."""
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
    env = make_tiny_repo(repo, import_real, steps=2,
                         params={"ray": {"num_workers": 1}, "train_vae": {"steps": 0}, "train_base": {"steps": 0}})
    env = begin_pipeline_run(repo, env)
    job = BackgroundRepro(repo, env, base / "ray")
    try:
        yield repo, env, job.start()
    finally:
        job.close()


@pytest.fixture
def real_data_repro_beside(request: pytest.FixtureRequest) -> None:
    """Start ``real_data_repro`` now if its test is selected in this session (else nothing)."""
    if any(item.path.name == REAL_DATA_TEST for item in request.session.items):
        request.getfixturevalue("real_data_repro")
