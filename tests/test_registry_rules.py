"""The promotion rule on hand-made metrics (pipelines.promotion, no MLflow): decisions, params validation."""

from __future__ import annotations

import pytest

from g2p.config import ConfigError
from pipelines.promotion import (
    PromoteSection, absent_sections, decide, flatten_metrics, metric_absence, metric_key, resolve_metric,
)
from pipelines.registry import RegisterSection, load_sections

M = ("seen.g2pdiffusion.success@10", "unseen.g2pdiffusion.success@10")


def flat(seen: float, unseen: float, half: float = 0.05) -> dict[str, float]:
    raw = {"seen": {"g2pdiffusion": {"success@10": seen, "success@10_low": seen - half,
                                     "success@10_high": seen + half}},
           "unseen": {"g2pdiffusion": {"success@10": unseen, "success@10_low": unseen - half,
                                       "success@10_high": unseen + half}}}
    return {metric_key(k): v for k, v in flatten_metrics(raw).items()}


def run(chal: dict, champ: dict | None, rule: str = "not_worse_ci", *, min_delta: float = 0.0, force: bool = False,
        chal_hash: str = "h", champ_hash: str = "h", **kw):
    section = PromoteSection(metrics=M, rule=rule, min_delta=min_delta, **kw)
    return decide("g2pdiffusion", "2", chal, "1" if champ is not None else None, champ, section,
                  chal_hash=chal_hash, champ_hash=champ_hash, force=force)


def test_first_model_becomes_champion() -> None:
    d = run(flat(0.1, 0.0), None)
    assert d.action == "first" and d.promote and d.champion_after == "2"


def test_not_worse_ci_accepts_within_the_champions_interval_and_rejects_below() -> None:
    champ = flat(0.50, 0.20)  # lower bounds 0.45 / 0.15
    assert run(flat(0.46, 0.16), champ).action == "promoted"  # worse point estimates, inside the intervals
    d = run(flat(0.46, 0.14), champ)
    assert (d.action, d.promote) == ("kept", False)
    assert [c.passed for c in d.checks] == [True, False]
    assert "unseen.g2pdiffusion.success@10" in d.reason
    assert d.checks[1].reference == pytest.approx(0.15) and d.checks[1].champion_low == pytest.approx(0.15)


def test_point_and_strict_rules_and_min_delta() -> None:
    champ = flat(0.50, 0.20)
    assert run(flat(0.50, 0.20), champ, "not_worse_point").promote
    assert not run(flat(0.49, 0.20), champ, "not_worse_point").promote
    assert run(flat(0.49, 0.20), champ, "not_worse_point", min_delta=-0.02).promote  # a tolerance
    assert not run(flat(0.50, 0.20), champ, "strictly_better").promote  # a tie is not better
    assert run(flat(0.51, 0.21), champ, "strictly_better").promote
    assert not run(flat(0.51, 0.21), champ, "strictly_better", min_delta=0.05).promote  # a required gain
    assert not run(flat(0.46, 0.16), champ, min_delta=0.02).promote  # ci rule with margin: needs 0.47 / 0.17


def test_different_evaluation_sets_are_refused_unless_forced() -> None:
    champ = flat(0.1, 0.1)
    d = run(flat(0.9, 0.9), champ, chal_hash="aaa", champ_hash="bbb")
    assert (d.action, d.promote) == ("refused", False) and "eval_config_hash" in d.reason
    assert run(flat(0.9, 0.9), champ, chal_hash="aaa", champ_hash="bbb", require_same_eval=False).promote
    assert run(flat(0.9, 0.9), champ, chal_hash=None, champ_hash=None).action == "refused"  # unknown != same
    f = run(flat(0.0, 0.0), champ, chal_hash="aaa", champ_hash="bbb", force=True)
    assert (f.action, f.promote) == ("forced", True) and "different sets" in f.reason


def test_force_promotes_a_worse_model_and_says_the_rule_failed() -> None:
    d = run(flat(0.0, 0.0), flat(0.5, 0.5), force=True)
    assert (d.action, d.promote) == ("forced", True) and "rule failed" in d.reason
    assert "FORCED" in d.text() and "FAIL" in d.text()


def test_missing_metric_or_interval_names_it() -> None:
    with pytest.raises(ValueError, match="seen.g2pdiffusion.success@10.*not found"):
        run({}, None)
    no_ci = {k: v for k, v in flat(0.5, 0.5).items() if not k.endswith(("_low", "_high"))}
    with pytest.raises(ValueError, match="not_worse_ci needs 'seen.g2pdiffusion.success@10_low'"):
        run(flat(0.5, 0.5), no_ci)
    assert run(flat(0.5, 0.5), no_ci, "not_worse_point").promote


def test_flatten_and_metric_keys() -> None:
    f = flatten_metrics({"a": {"b@1": 1, "ok": True, "s": "x", "nan": float("nan")}, "eval_config_hash": "h",
                         "threshold": 0.25})
    assert f == {"a.b@1": 1.0, "threshold": 0.25}
    assert metric_key("seen.g2pdiffusion.success@10_low") == "seen.g2pdiffusion.success_at_10_low"


def test_sections_are_strict(tmp_path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("promote:\n  rule: better\n")
    with pytest.raises(ConfigError, match="promote.rule: 'better' is not one of"):
        load_sections(p)
    p.write_text("register:\n  modelname: x\n")
    with pytest.raises(ConfigError, match="unknown key register.modelname"):
        load_sections(p)
    with pytest.raises(ConfigError, match="register.model_name"):
        RegisterSection(model_name="bad name!")
    with pytest.raises(ConfigError, match=r"promote.metrics\[0\]"):
        PromoteSection(metrics=("seen..x",))
    p.write_text("register:\n  auto_promote: false\npromote:\n  metrics: [seen.g2pdiffusion.success@1]\n")
    reg, prom = load_sections(p)
    assert reg.auto_promote is False and prom.metrics == ("seen.g2pdiffusion.success@1",)


def test_kmax_takes_the_largest_evaluated_k() -> None:
    raw = {"seen": {"g2pdiffusion": {f"success@{k}": k / 100 for k in (1, 2, 10)} | {"success@10_low": 0.05}}}
    chal = {metric_key(k): v for k, v in flatten_metrics(raw).items()}
    assert resolve_metric("seen.g2pdiffusion.success@kmax", chal) == "seen.g2pdiffusion.success@10"
    assert resolve_metric("seen.g2pdiffusion.success@2", chal) == "seen.g2pdiffusion.success@2"
    with pytest.raises(ValueError, match="'unseen.g2pdiffusion.success@kmax': no unseen.g2pdiffusion.success@<k>"):
        resolve_metric("unseen.g2pdiffusion.success@kmax", chal)
    section = PromoteSection(metrics=("seen.g2pdiffusion.success@kmax",), rule="not_worse_point")
    d = decide("g2pdiffusion", "2", chal, "1", chal, section, chal_hash="h", champ_hash="h")
    assert [c.metric for c in d.checks] == ["seen.g2pdiffusion.success@10"] and d.promote


def test_absent_truth_metrics_are_n_a_with_their_reason() -> None:
    """Real data: metrics.json records ``traits: {"absent": why}``; a gate metric there is n/a, not a crash."""
    why = "no synthetic ground truth at data/x.parquet"
    metrics = {"seen": {"g2pdiffusion": {"success@10": 0.5}}, "traits": {"absent": why},
               "variation": {"deep": {"absent": "no reader"}, "score": 1.0}}
    absent = absent_sections(metrics)
    assert absent == {"traits": why, "variation.deep": "no reader"}
    assert metric_absence("traits.seen.g2pdiffusion.mean_normalised_error", absent) == f"traits absent: {why}"
    assert metric_absence("traitsx.a", absent) is None
    assert metric_absence("seen.g2pdiffusion.success@10", absent) is None

    trait = "traits.seen.g2pdiffusion.mean_normalised_error"
    section = PromoteSection(metrics=("seen.g2pdiffusion.success@10", trait), rule="not_worse_point")
    chal = {metric_key(k): v for k, v in flatten_metrics(metrics).items()}
    d = decide("g2pdiffusion", "1", chal, None, None, section, chal_absent=absent)
    assert d.action == "first" and d.absent == absent and "not measured, so not judged: " + trait in d.reason
    assert d.checks[1].passed is None and why in d.checks[1].text() and "n/a" in d.checks[1].text()
    assert f"not measured: traits ({why})" in d.text()
    # against a champion: judged on the measured metric only, and the decision says so
    d = decide("g2pdiffusion", "2", chal, "1", chal, section, chal_hash="h", champ_hash="h",
               chal_absent=absent, champ_absent=absent)
    assert d.action == "promoted" and trait in d.reason and [c.passed for c in d.checks] == [True, None]
    # absent for the champion only: still n/a (cannot be compared)
    d = decide("g2pdiffusion", "2", {**chal, metric_key(trait): 0.3}, "1", chal, section, chal_hash="h",
               champ_hash="h", champ_absent=absent)
    assert d.checks[1].absent == f"traits absent: {why}"
    # nothing measured: nothing to decide on
    only = PromoteSection(metrics=(trait,))
    d = decide("g2pdiffusion", "1", chal, None, None, only, chal_absent=absent)
    assert (d.action, d.promote) == ("refused", False) and why in d.reason
    assert decide("g2pdiffusion", "1", chal, None, None, only, chal_absent=absent, force=True).promote
    # a metric that is simply missing (not recorded absent) is still an error naming it
    with pytest.raises(ValueError, match=f"{trait}.*not found"):
        decide("g2pdiffusion", "1", chal, None, None, only)


def test_paired_rule_needs_the_lower_bound_of_the_paired_difference_to_reach_the_margin() -> None:
    import numpy as np
    import pandas as pd

    from pipelines.promotion import paired_differences

    def table(success: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"split": "seen", "processid": [str(i) for i in range(len(success))],
                             "species": [f"sp{i // 3}" for i in range(len(success))], "row": "g2pdiffusion",
                             "success@10": success})

    rng = np.random.default_rng(0)
    champ = rng.integers(0, 2, 90).astype(float)
    chal = champ.copy()
    chal[np.nonzero(champ)[0][:3]] = 0.0  # 3 of 90 barcodes lost: -3.3 points
    one = ("seen.g2pdiffusion.success@10",)
    paired = paired_differences(table(chal), table(champ)[::-1], one, reps=500)  # row order does not matter
    p = paired[one[0]]
    assert p["diff"] == pytest.approx(-3 / 90) and p["n_clusters"] == 30 and p["mdd"] > 0
    section = PromoteSection(metrics=one)  # paired_not_worse, min_delta -0.05
    seen = {metric_key(one[0]): float(chal.mean())}
    d = decide("g2pdiffusion", "2", seen, "1", {metric_key(one[0]): float(champ.mean())}, section, chal_hash="h",
               champ_hash="h", paired=paired)
    assert d.promote == (p["low"] >= -0.05) and d.checks[0].paired == p
    strict = PromoteSection(metrics=one, min_delta=0.0)
    assert not decide("g2pdiffusion", "2", seen, "1", seen, strict, chal_hash="h", champ_hash="h",
                      paired=paired).promote
    refused = decide("g2pdiffusion", "2", seen, "1", seen, section, chal_hash="h", champ_hash="h")
    assert refused.action == "refused" and "per-barcode" in refused.reason
    with pytest.raises(ValueError, match="different records"):
        paired_differences(table(chal)[:80], table(champ), one)
    with pytest.raises(ConfigError, match="promote.rule: 'better'"):
        PromoteSection(rule="better")
