"""The registered model's pyfunc: the HTTP field names (``n``), both generator layouts, the pipeline's bytes."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from g2p.images import png_bytes
from g2p.pipeline import images_uint8
from pipelines.g2p_pyfunc import INPUT_COLUMNS, OUTPUT_COLUMNS, G2PModel
from serving.testing import tiny_model, tiny_pipeline

BARCODE = "ACGT" * 150

pytestmark = pytest.mark.usefixtures("one_thread")


def loaded(folder) -> G2PModel:
    m = G2PModel()
    m.load_context(SimpleNamespace(artifacts={"generator": str(folder)}, model_config={"model_version": "7"}))
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, G2PModel]:
    tmp = tmp_path_factory.mktemp("pyfunc")
    return {"old": loaded(tiny_model(tmp / "old", seed=0)), "new": loaded(tiny_pipeline(tmp / "new", seed=0))}


def test_both_layouts_load_and_give_the_pipelines_bytes(models) -> None:
    assert "n" in INPUT_COLUMNS and "num_images" not in INPUT_COLUMNS and "cfg_scale" not in INPUT_COLUMNS
    row = {"barcode": BARCODE.lower(), "latitude": 45.5, "longitude": -73.6, "n": 2, "steps": 2,
           "guidance_scale": 3.0, "aligner_guidance_scale": 1.0, "seed": 5}
    outs = {}
    for layout, m in models.items():
        assert m.pipeline is m.generator and m.judge is None and m.info["judge"] == "absent"
        out = m.predict(None, pd.DataFrame([row, {"barcode": BARCODE, "n": 1, "steps": 2, "scheduler": "ddpm"}]))
        assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 3
        assert list(out["row"]) == [0, 0, 1] and list(out["sample"]) == [0, 1, 0]
        assert out.loc[0, "barcode"] == BARCODE and out.loc[0, "score"] is None
        imgs = m.pipeline(BARCODE, 45.5, -73.6, num_images_per_barcode=2, num_inference_steps=2, guidance_scale=3.0,
                          aligner_guidance_scale=1.0, generator=torch.Generator().manual_seed(5),
                          output_type="pt").images
        assert [png_bytes(im) for im in images_uint8(imgs)] == list(out["image"][:2])
        outs[layout] = list(out["image"])
    assert outs["old"] == outs["new"]  # the same weights in either layout


@pytest.mark.parametrize("row, text", [
    ({"barcode": BARCODE, "steps": 0}, r"steps\[0\]: 0 is invalid"),
    ({"barcode": BARCODE, "n": 65}, r"n\[0\]: 65 is invalid"),
    ({"barcode": BARCODE, "latitude": 91.0, "longitude": 0.0}, r"latitude\[0\]: 91.0"),
    ({"barcode": BARCODE, "scheduler": "plms"}, r"scheduler\[0\]: 'plms'"),
    ({"barcode": "ACGT"}, r"barcode\[0\]: 'ACGT' is invalid"),
])
def test_a_bad_row_names_the_field_and_the_row(models, row, text) -> None:
    with pytest.raises(ValueError, match=text):
        models["new"].predict(None, pd.DataFrame([row]))


def test_unknown_columns_are_refused(models) -> None:
    with pytest.raises(ValueError, match="unknown column 'num_images'"):
        models["new"].predict(None, pd.DataFrame([{"barcode": BARCODE, "num_images": 1}]))
