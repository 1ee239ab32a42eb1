"""G2PDiffusion: DNA barcode + place -> phenotype images.

The public surface, imported lazily so ``import g2p`` stays light:

    from g2p import G2PConfig, KmerTokenizer, Generator
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["G2PConfig", "KmerTokenizer", "Generator", "G2PDiffusion", "preset"]

_WHERE = {
    "G2PConfig": "g2p.config",
    "preset": "g2p.config",
    "KmerTokenizer": "g2p.tokenizer",
    "Generator": "g2p.generate",
    "G2PDiffusion": "g2p.model",
}

if TYPE_CHECKING:  # pragma: no cover
    from g2p.config import G2PConfig, preset
    from g2p.generate import Generator
    from g2p.model import G2PDiffusion
    from g2p.tokenizer import KmerTokenizer


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'g2p' has no attribute {name!r}")
