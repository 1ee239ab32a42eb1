"""The promotion rule, pure: two versions' metrics in, a :class:`Decision` out (no MLflow here).

Rules (every metric of ``promote.metrics`` must pass; higher is better;
``d = promote.min_delta``, may be negative as a tolerance):

- ``paired_not_worse`` (the default): the two versions' per-barcode results on
  the same barcodes and image seeds (``evaluation/per_barcode.parquet``) are
  paired; the lower bound of the 95% species-clustered interval of
  challenger - champion must be >= d (d < 0: the largest loss tolerated, a
  non-inferiority margin). Each check also reports the minimum detectable
  difference of that evaluation, so a "pass" on too few barcodes reads as what it is;
- ``not_worse_ci``: challenger >= champion's lower 95% bound + d (unpaired: it
  would pass a challenger clearly worse than a champion with a wide interval);
- ``not_worse_point``: challenger >= champion + d;
- ``strictly_better``: challenger > champion + d.

With ``promote.require_same_eval`` both versions must carry the same
``eval_config_hash`` (same evaluation set and settings), else the gate
refuses. No champion yet: the first model becomes champion. ``force`` promotes
regardless, but the checks are still computed and recorded.

Absent metrics: ``metrics.json`` marks a section it could not measure as
``{"absent": "<reason>"}`` (``traits`` on real data: there is no synthetic
ground truth). :func:`absent_sections` finds them; a gate metric under such a
section (in either version) is an ``n/a`` check carrying the reason, neither
passed nor failed, and the decision rests on the others and says so. If every
gate metric is absent the gate refuses: there is nothing to decide on.
Metric names are dotted paths into ``metrics.json``; in MLflow they become
:func:`metric_key` (``@`` is not allowed there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from g2p.config import ConfigError

Rule = Literal["paired_not_worse", "not_worse_ci", "not_worse_point", "strictly_better"]
PAIRED = "paired_not_worse"

@dataclass(frozen=True)
class PromoteSection:
    """The ``promote`` key: which metrics (paths into ``metrics.json``, higher = better) and which rule.

    ``@kmax`` ends a path with the largest k evaluated (see :func:`resolve_metric`).
    """

    metrics: tuple[str, ...] = ("seen.g2pdiffusion.success@kmax", "unseen.g2pdiffusion.success@kmax")
    rule: Rule = PAIRED
    min_delta: float = -0.05  # paired_not_worse: at most 5 points worse, with 95% confidence
    require_same_eval: bool = True

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("promote.metrics: at least one metric is needed")
        for i, m in enumerate(self.metrics):
            if not m or m.startswith(".") or m.endswith(".") or ".." in m:
                raise ConfigError(f"promote.metrics[{i}]: {m!r} is not a dotted path like seen.g2pdiffusion.success@10")
        if not math.isfinite(self.min_delta):
            raise ConfigError(f"promote.min_delta: {self.min_delta!r} must be finite")
        if self.rule not in RULES:
            raise ConfigError(f"promote.rule: {self.rule!r} is not one of {list(RULES)}")


RULES: tuple[str, ...] = (PAIRED, "not_worse_ci", "not_worse_point", "strictly_better")


def paired_differences(chal: Any, champ: Any, metrics: Sequence[str], reps: int = 1000,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """Challenger - champion per gate metric, paired on the barcodes both versions were evaluated on.

    ``chal``, ``champ``: the evaluate stage's per-barcode tables (``per_barcode.parquet``: split,
    processid, species, row and one column per measurement). A metric path ``split.row.measurement``
    (``@kmax`` resolved) selects a column; the interval resamples whole species
    (:func:`g2p.evaluation.metrics.paired_difference`). The two versions must cover the same records.
    """
    from g2p.evaluation.metrics import paired_difference

    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        parts = m.split(".", 2)
        if len(parts) != 3:
            raise ValueError(f"promote.metrics: {m!r} is not split.row.measurement, which {PAIRED} pairs per barcode")
        split, row, key = parts
        sel = [t[(t["split"] == split) & (t["row"] == row)].set_index("processid") for t in (chal, champ)]
        for who, t in zip(("challenger", "champion"), sel):
            if key not in t.columns or t.empty:
                raise ValueError(f"promote.metrics: {m!r}: the {who}'s per-barcode results have no {row!r} rows "
                                 f"of split {split!r} with {key!r}")
        a, b = sel
        if set(a.index) != set(b.index):
            raise ValueError(f"promote.metrics: {m!r}: the versions were evaluated on different records "
                             f"({len(a)} and {len(b)}, {len(set(a.index) & set(b.index))} shared); re-evaluate both")
        b = b.loc[a.index]
        out[m] = paired_difference(a[key].to_numpy(), b[key].to_numpy(), a["species"].to_numpy(), reps, seed)
    return out



def metric_key(name: str) -> str:
    """A ``metrics.json`` path -> an MLflow metric/tag name (``@`` is not allowed there)."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite numeric scalar of a nested dict, keyed by its dotted path (booleans and strings left out)."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, f"{path}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[path] = float(v)
    return out


def absent_sections(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted path -> reason for every section of ``metrics.json`` recorded as ``{"absent": reason}``."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            if "absent" in v and isinstance(v["absent"], str):
                out[f"{prefix}{k}"] = v["absent"]
            else:
                out.update(absent_sections(v, f"{prefix}{k}."))
    return out


def metric_absence(name: str, absent: Mapping[str, str]) -> str | None:
    """Why metric ``name`` is absent (it lies under an absent section), else None. Paths compare in
    :func:`metric_key` form, as the version tags hold them."""
    key = metric_key(name)
    for path, reason in absent.items():
        if key == metric_key(path) or key.startswith(metric_key(path) + "."):
            return f"{path} absent: {reason}"
    return None


@dataclass
class MetricCheck:
    """One metric of the gate: both versions' point estimates and 95% intervals, and the verdict."""

    metric: str
    challenger: float | None  # None when absent
    challenger_low: float | None
    challenger_high: float | None
    champion: float | None = None
    champion_low: float | None = None
    champion_high: float | None = None
    reference: float | None = None  # what the challenger had to reach
    op: str = ">="  # how it had to reach it (">" for strictly_better)
    passed: bool | None = None
    absent: str | None = None  # why the metric could not be measured (then passed is None)
    paired: dict[str, float] | None = None  # paired_not_worse: challenger - champion (diff, low, high, se, mdd, ...)

    def text(self) -> str:
        def ci(v: float | None, lo: float | None, hi: float | None) -> str:
            if v is None:
                return "-"
            return f"{v:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "")

        if self.absent is not None:
            return f"{self.metric}: n/a ({self.absent})"
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[self.passed]
        head = (f"{self.metric}: challenger {ci(self.challenger, self.challenger_low, self.challenger_high)}"
                f" vs champion {ci(self.champion, self.champion_low, self.champion_high)}")
        if self.paired is not None:
            p = self.paired
            return (f"{head}; paired difference {p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] on "
                    f"{p['n_barcodes']} barcodes of {p['n_clusters']} species (needs lower bound >= "
                    f"{self.reference:+.4f}; minimum detectable difference {p['mdd']:.4f}): {verdict}")
        ref = f" (needs {self.op} {self.reference:.4f})" if self.reference is not None else ""
        return f"{head}{ref}: {verdict}"


@dataclass
class Decision:
    """What the gate (or a person) did and why; recorded on the model version and printed."""

    action: Literal["promoted", "kept", "refused", "first", "forced", "rollback", "unchanged"]
    promote: bool
    reason: str
    model_name: str
    version: str  # the version the decision is about (challenger, or the rollback target)
    champion_before: str | None
    rule: str = ""
    min_delta: float = 0.0
    checks: list[MetricCheck] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)  # the challenger's unmeasured sections: reason
    eval_config_hash: dict[str, str | None] = field(default_factory=dict)
    by: str = ""
    at: str = ""
    dry_run: bool = False

    @property
    def champion_after(self) -> str | None:
        return self.version if self.promote else self.champion_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["champion_after"] = self.champion_after
        return d

    def text(self) -> str:
        head = (f"{self.model_name} v{self.version}: {self.action.upper()}"
                f"{' (dry run, nothing changed)' if self.dry_run else ''} -- {self.reason}")
        lines = [head, f"champion: {self.champion_before or '(none)'} -> {self.champion_after or '(none)'}"]
        if self.rule:
            lines.append(f"rule: {self.rule}, min_delta {self.min_delta:g}")
        lines += [f"  {c.text()}" for c in self.checks]
        lines += [f"  not measured: {path} ({reason})" for path, reason in self.absent.items()]
        if self.by:
            lines.append(f"by {self.by} at {self.at}")
        return "\n".join(lines)


def resolve_metric(name: str, flat: Mapping[str, float]) -> str:
    """``...@kmax`` -> ``...@<largest k the metrics hold>`` (keys of ``flat`` as :func:`metric_key` makes them).

    The largest evaluated k depends on the preset (tiny 2, default 10, paper
    100); ``kmax`` lets one ``promote`` section serve them all. Two versions
    with the same ``eval_config_hash`` share their ks, so the challenger's
    resolution holds for the champion too.
    """
    if not name.endswith("@kmax"):
        return name
    prefix = name[: -len("kmax")]
    pattern = re.compile(re.escape(metric_key(prefix)) + r"(\d+)")
    ks = [int(m.group(1)) for k in flat if (m := pattern.fullmatch(k))]
    if not ks:
        raise ValueError(f"promote.metrics: {name!r}: no {prefix}<k> in the metrics (has e.g. {sorted(flat)[:5]})")
    return f"{prefix}{max(ks)}"


def _get(flat: Mapping[str, float], name: str, version: str) -> float:
    key = metric_key(name)
    if key not in flat:
        raise ValueError(f"promote.metrics: {name!r} not found in the metrics of version {version} "
                         f"(has e.g. {sorted(flat)[:5]})")
    return flat[key]


def decide(model_name: str, challenger: str, chal: Mapping[str, float], champion: str | None,
           champ: Mapping[str, float] | None, section: PromoteSection, *, chal_hash: str | None = None,
           champ_hash: str | None = None, force: bool = False, chal_absent: Mapping[str, str] | None = None,
           champ_absent: Mapping[str, str] | None = None,
           paired: Mapping[str, Mapping[str, float]] | None = None) -> Decision:
    """The promotion rule on two versions' flattened metrics (keys as :func:`metric_key` makes them).

    Pure: no MLflow. ``champ`` None = there is no champion yet (the first model
    becomes champion). ``force`` promotes whatever the metrics say, but the
    checks are still computed and recorded. ``chal_absent`` / ``champ_absent``:
    each version's :func:`absent_sections` (see the module docstring).
    ``paired``: for ``paired_not_worse``, :func:`paired_differences` of the
    gate's metrics (None: the per-barcode results were not available).
    """
    chal_absent, champ_absent = dict(chal_absent or {}), dict(champ_absent or {})
    hashes = {"challenger": chal_hash, "champion": champ_hash}
    common = dict(model_name=model_name, version=challenger, champion_before=champion, rule=section.rule,
                  min_delta=section.min_delta, eval_config_hash=hashes, absent=chal_absent)
    checks = []
    for m in section.metrics:
        why = metric_absence(m, chal_absent) or (metric_absence(m, champ_absent) if champ is not None else None)
        if why is not None:
            checks.append(MetricCheck(m, None, None, None, absent=why))
            continue
        m = resolve_metric(m, chal)
        checks.append(MetricCheck(m, _get(chal, m, challenger), chal.get(metric_key(m + "_low")),
                                  chal.get(metric_key(m + "_high"))))
    measured = [c for c in checks if c.absent is None]
    skipped = [c.metric for c in checks if c.absent is not None]
    note = f"; not measured, so not judged: {', '.join(skipped)}" if skipped else ""
    if not measured:
        why = f"no metric of promote.metrics was measured ({'; '.join(c.absent for c in checks)})"
        if force:
            return Decision("forced", True, f"forced by a person although {why}", checks=checks, **common)
        return Decision("refused", False, why, checks=checks, **common)
    if champion is None or champ is None:
        return Decision("first", True, "no champion yet: the first model becomes champion" + note,
                        checks=checks, **common)
    if champion == challenger:
        return Decision("unchanged", False, f"version {challenger} is already champion", checks=checks, **common)
    unpaired = [c.metric for c in measured if c.metric not in (paired or {})]
    if section.rule == PAIRED and unpaired and not force:
        why = (f"{PAIRED} needs both versions' per-barcode results on the same records "
               f"(evaluation/per_barcode.parquet of their register runs) for {', '.join(unpaired)}; "
               f"re-evaluate, choose another promote.rule, or --force")
        return Decision("refused", False, why, checks=checks, **common)
    for c in measured:
        c.champion = _get(champ, c.metric, champion)
        c.champion_low = champ.get(metric_key(c.metric + "_low"))
        c.champion_high = champ.get(metric_key(c.metric + "_high"))
        if section.rule == PAIRED:
            c.paired = dict((paired or {}).get(c.metric) or {}) or None
            c.reference = section.min_delta
            c.passed = c.paired is not None and c.paired["low"] >= section.min_delta
        elif section.rule == "not_worse_ci":
            if c.champion_low is None:
                raise ValueError(f"promote.rule: not_worse_ci needs {c.metric + '_low'!r} in the metrics of "
                                 f"version {champion}; use not_worse_point or add intervals")
            c.reference = c.champion_low + section.min_delta
            c.passed = c.challenger >= c.reference
        elif section.rule == "not_worse_point":
            c.reference = c.champion + section.min_delta
            c.passed = c.challenger >= c.reference
        else:  # strictly_better
            c.reference, c.op = c.champion + section.min_delta, ">"
            c.passed = c.challenger > c.reference
    same_eval = chal_hash is not None and chal_hash == champ_hash
    if section.require_same_eval and not same_eval:
        why = (f"evaluated on different sets: eval_config_hash {str(chal_hash)[:12]} (challenger) vs "
               f"{str(champ_hash)[:12]} (champion); re-evaluate both on one set, or --force")
        if force:
            return Decision("forced", True, f"forced by a person although {why}", checks=checks, **common)
        return Decision("refused", False, why, checks=checks, **common)
    failed = [c.metric for c in measured if not c.passed]
    if force:
        why = f"forced by a person ({'rule passed' if not failed else 'rule failed on ' + ', '.join(failed)})"
        return Decision("forced", True, why + note, checks=checks, **common)
    if failed:
        return Decision("kept", False, f"{section.rule} failed on {', '.join(failed)}{note}", checks=checks, **common)
    return Decision("promoted", True, f"{section.rule} passed on every measured metric{note}" if note else
                    f"{section.rule} passed on every metric", checks=checks, **common)


def notify_serving(d: Decision, address: str | None = None, app: str = "g2p") -> str | None:
    """After a decision that moved ``champion``: pin the new version in the ``user_config`` of the Serve
    application ``app`` on the cluster whose dashboard is ``address`` (default ``G2P_SERVE_ADDRESS``), so
    every replica reconfigures to it in place (``serving.serve_config.push_promotion``). None: nothing
    to notify (no address, a dry run, or the champion did not move); otherwise what was done, in words."""
    import os

    address = address or os.environ.get("G2P_SERVE_ADDRESS")
    if not address or d.dry_run or not d.promote:
        return None
    from serving.serve_config import push_promotion

    return push_promotion(address, d.model_name, d.version, app)
