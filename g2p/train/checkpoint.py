"""Checkpoints as safetensors that describe themselves (never pickle).

Every file carries the full :class:`~g2p.config.G2PConfig` as JSON in its
safetensors metadata (as k-diffusion does), so a generator, the MLflow model
and the servers load it without ``params.yaml``. Training state (optimiser,
schedule, EMA) is a nested dict: its tensors go into the safetensors body and
the rest (ints, floats, param groups) into a JSON skeleton in the metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from g2p.config import G2PConfig, migrate_legacy

CONFIG_KEY = "g2p_config"
COMPONENT_KEY = "component"
TREE_KEY = "tree"


class ArchitectureMismatch(ValueError):
    """A checkpoint was built with a different architecture than the config asks for."""


# ----------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------


def save_module(path: str | Path, module: nn.Module | dict[str, torch.Tensor], config: G2PConfig,
                component: str, extra: dict[str, str] | None = None) -> None:
    """Write a module's state dict (contiguous, detached) with the config in the metadata.

    ``extra`` adds string metadata (e.g. a diffusers module's own config) beside it.
    """
    sd = module.state_dict() if isinstance(module, nn.Module) else module
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {**(extra or {}), CONFIG_KEY: config.to_json(), COMPONENT_KEY: component}
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def config_from_checkpoint(path: str | Path) -> G2PConfig:
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: not a g2p checkpoint (no {CONFIG_KEY!r} in its metadata)")
    return G2PConfig.from_dict(migrate_legacy(json.loads(meta[CONFIG_KEY])))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def load_module(path: str | Path, module: nn.Module, expected: G2PConfig | None = None,
                sections: tuple[str, ...] = ()) -> nn.Module:
    """Load weights into ``module``; refuse, naming the field, when the architecture differs.

    ``sections`` lists the config sections that define this component's
    architecture (``("unet", "vae")``, ...); they must match ``expected``.
    """
    if expected is not None and sections:
        check_architecture(config_from_checkpoint(path), expected, sections, where=str(path))
    sd = load_state_dict(path)
    own = module.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ArchitectureMismatch(
                f"{path}: tensor {k} has shape {tuple(v.shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model")
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ArchitectureMismatch(
            f"{path}: state dict does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module


# Sections whose fields shape the weights, and the fields in them that do not
# (training knobs, where weights came from, measured values a checkpoint owns).
ARCHITECTURE_SECTIONS = ("tokenizer", "conditioner", "vae", "unet", "lora", "aligner", "diffusion")
NOT_ARCHITECTURE = frozenset({
    "pretrained_path", "dropout", "mlm_probability", "foreground_weight", "background_threshold",
    "kl_weight", "scaling_factor", "temperature_init", "symmetric_loss", "condition_dropout",
    "timestep_sampling", "timestep_logit_mean", "timestep_logit_std", "loss_weighting", "min_snr_gamma",
    "train_conditioner",
})


def check_architecture(saved: G2PConfig, expected: G2PConfig,
                       sections: tuple[str, ...] = ARCHITECTURE_SECTIONS, where: str = "checkpoint") -> None:
    """Raise :class:`ArchitectureMismatch` naming the first differing ``section.field``."""
    for sec in sections:
        a, b = getattr(saved, sec), getattr(expected, sec)
        for f in dataclasses.fields(a):
            if f.name in NOT_ARCHITECTURE:
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                raise ArchitectureMismatch(
                    f"{where}: {sec}.{f.name} is {va!r} in the checkpoint but {vb!r} in the config")


# ----------------------------------------------------------------------------
# training state (nested dicts of tensors and plain values)
# ----------------------------------------------------------------------------


def save_tree(path: str | Path, tree: Any, config: G2PConfig | None = None, component: str = "state") -> None:
    """Save a nested dict/list whose leaves are tensors or JSON values."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(node: Any, key: str) -> Any:
        if torch.is_tensor(node):
            tensors[key] = node.detach().contiguous().cpu()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[enc(k, f"{key}.k{i}") if not isinstance(k, (str, int)) else k,
                                  enc(v, f"{key}.{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return [enc(v, f"{key}.{i}") for i, v in enumerate(node)]
        return node

    skeleton = enc(tree, "t")
    meta = {TREE_KEY: json.dumps(skeleton), COMPONENT_KEY: component}
    if config is not None:
        meta[CONFIG_KEY] = config.to_json()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_tree(path: str | Path) -> Any:
    meta = read_metadata(path)
    tensors = load_state_dict(path)

    def dec(node: Any) -> Any:
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__dict__" in node:
            return {k: dec(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [dec(v) for v in node]
        return node

    return dec(json.loads(meta[TREE_KEY]))
