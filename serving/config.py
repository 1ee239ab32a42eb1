"""The ``serve`` section of ``params.yaml``: bounds, batching, replicas, the Serve config's runtime env.

Validated here (not by the model config): unknown keys and wrong types name
``serve.<key>``; ``g2p config dump`` prints the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g2p.config import ConfigError, _build


@dataclass(frozen=True)
class ServeSection:
    """How the phenotype endpoint serves (Ray Serve and BentoML alike).

    ``max_n``/``max_steps`` bound a request (422 beyond them); ``default_steps``
    0 takes the checkpoint's ``sampling.steps``. ``max_batch_size`` and
    ``batch_wait_timeout_s`` feed ``@serve.batch`` (1 = unbatched).
    ``autoscaling`` replaces ``num_replicas`` by ``min_replicas``..``max_replicas``
    scaled on ``target_ongoing_requests``. ``request_timeout_s``: the longest a
    request may run (504 after). ``working_dir`` and ``pip`` are the runtime env
    of the Serve config ``g2p serve config`` writes (``serving/serve_config.py``):
    a URI of the code (e.g. a repository archive at a commit, ``https://.../<sha>.zip``)
    and pip pins to install on the cluster; empty = the cluster's image has both.

    New model versions reach the replicas through Serve's ``user_config`` (a
    promotion redeploys it), not by polling: the old ``reload_interval_s`` key
    is refused with that explanation (:data:`REMOVED_KEYS`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_uri: str = "models:/g2pdiffusion@champion"
    max_n: int = 8
    max_steps: int = 100
    default_n: int = 4
    default_steps: int = 0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    num_replicas: int = 1
    autoscaling: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    request_timeout_s: float = 120.0
    max_vary_rates: int = 6
    working_dir: str = ""
    pip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("port", 0 <= self.port <= 65535), ("max_n", self.max_n >= 1), ("max_steps", self.max_steps >= 1),
            ("default_n", 1 <= self.default_n <= self.max_n),
            ("default_steps", 0 <= self.default_steps <= self.max_steps),
            ("max_batch_size", self.max_batch_size >= 1), ("batch_wait_timeout_s", self.batch_wait_timeout_s >= 0),
            ("num_replicas", self.num_replicas >= 1), ("min_replicas", self.min_replicas >= 0),
            ("max_replicas", self.max_replicas >= max(1, self.min_replicas)),
            ("target_ongoing_requests", self.target_ongoing_requests > 0),
            ("num_cpus", self.num_cpus >= 0), ("num_gpus", self.num_gpus >= 0),
            ("request_timeout_s", self.request_timeout_s > 0),
            ("max_vary_rates", self.max_vary_rates >= 1), ("model_uri", bool(self.model_uri)),
            ("pip", all(isinstance(r, str) and r.strip() for r in self.pip)),
        )
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"serve.{key}: invalid value {getattr(self, key)!r}")


def section_dict(section: ServeSection) -> dict[str, Any]:
    """The section as plain YAML values (lists for tuples): what ``serve_section`` reads back."""
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


# Keys the section no longer has, with what replaced them (a clearer error than "unknown key").
REMOVED_KEYS = {"reload_interval_s": "replicas no longer poll for new versions: a promotion reaches them through "
                                     "Serve's user_config (g2p serve reconfigure, g2p promote --serve-address); "
                                     "delete the key"}


def serve_section(raw: dict[str, Any] | None) -> ServeSection:
    """Strictly build the section: unknown keys and wrong types name ``serve.<key>``."""
    for key, why in REMOVED_KEYS.items():
        if key in (raw or {}):
            raise ConfigError(f"serve.{key}: {raw[key]!r} is no longer a setting: {why}")
    return _build(ServeSection, raw or {}, "serve")


def load_serve_section(path: str | Path = "params.yaml") -> ServeSection:
    import yaml

    p = Path(path)
    raw = (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
    return serve_section(raw.get("serve"))
