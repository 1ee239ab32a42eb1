"""G2PDiffusion: DNA barcode + place -> phenotype images.

    from g2p import G2PDiffusionPipeline
    pipe = G2PDiffusionPipeline.from_pretrained("models/g2pdiffusion")

The public surface is imported lazily, so ``import g2p`` stays light; the
tokenizer module is imported at once so that ``transformers.AutoTokenizer``
knows :class:`KmerTokenizer` (``AutoTokenizer.from_pretrained(path + "/tokenizer")``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from g2p.tokenizer import KmerTokenizer  # registers the class with AutoTokenizer

__all__ = ["G2PConfig", "KmerTokenizer", "G2PDiffusionPipeline", "G2PDiffusionPipelineOutput", "G2PDiffusion",
           "ConditionerModel", "AlignerModel", "preset"]

_WHERE = {
    "G2PConfig": "g2p.config",
    "preset": "g2p.config",
    "G2PDiffusionPipeline": "g2p.pipeline",
    "G2PDiffusionPipelineOutput": "g2p.pipeline",
    "ConditionerModel": "g2p.pipeline",
    "AlignerModel": "g2p.pipeline",
    "G2PDiffusion": "g2p.model",
}

if TYPE_CHECKING:  # pragma: no cover
    from g2p.config import G2PConfig, preset
    from g2p.model import G2PDiffusion
    from g2p.pipeline import AlignerModel, ConditionerModel, G2PDiffusionPipeline, G2PDiffusionPipelineOutput


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'g2p' has no attribute {name!r}")
