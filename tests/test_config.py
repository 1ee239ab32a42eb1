"""The typed configuration: strict loading, presets as values, params.yaml in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from g2p.config import ConfigError, G2PConfig, load_params, preset
from g2p.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict_and_json(name: str) -> None:
    cfg = preset(name)
    assert isinstance(cfg, G2PConfig)
    assert G2PConfig.from_dict(cfg.to_dict()) == cfg
    assert G2PConfig.from_json(cfg.to_json()) == cfg


def test_unknown_key_names_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"sampling\.stepz"):
        G2PConfig().override({"sampling": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key samplin"):
        G2PConfig.from_dict({"samplin": {}})


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"sampling": {"steps": "25"}}, "sampling.steps"),
        ({"sampling": {"steps": 2.5}}, "sampling.steps"),
        ({"data": {"metadata_only": 1}}, "data.metadata_only"),
        ({"validate": {"image_sample": 0.5}}, "validate.image_sample"),
        ({"validate": {"image_sample": -3}}, r"validate.image_sample: -3"),
        ({"sampling": {"scheduler": "heun"}}, "sampling.scheduler"),
        ({"vae": {"block_out_channels": [32, "x"]}}, r"vae.block_out_channels\[1\]"),
        ({"vae": {"block_out_channels": 32}}, "vae.block_out_channels"),
    ],
)
def test_wrong_types_name_the_key(patch: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        G2PConfig().override(patch)


def test_ints_are_accepted_for_floats_and_set_replaces_one_key() -> None:
    cfg = G2PConfig().set("sampling.guidance_scale", 2)
    assert cfg.sampling.guidance_scale == 2.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.sampling.steps == G2PConfig().sampling.steps


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        preset("bogus")


def test_params_yaml_is_the_default_preset() -> None:
    """params.yaml states every knob of the embedded run; it must not drift from `default`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    model_sections = set(G2PConfig().to_dict())
    assert load_params(ROOT / "params.yaml") == preset("default")
    assert {k: raw[k] for k in model_sections} == preset("default").to_dict()


def test_params_file_with_unknown_section_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("sampling:\n  steps: 10\nnonsense:\n  a: 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load_params(p)
    p.write_text("sampling:\n  steps: 10\n")
    assert load_params(p, preset_name="tiny").sampling.steps == 10
    assert load_params(p, preset_name="tiny").vae == preset("tiny").vae
