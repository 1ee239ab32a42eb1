"""The Great Expectations suite of ``g2p data validate`` (GX Core 1.x).

What GX runs on, and why: not the 4 GB of raw metadata but a *derived frame*
with one row per record holding exactly the quantities each expectation
judges (built in :mod:`pipelines.validation` by the rules of
:mod:`g2p.data.normalise`): the normalised barcode's length, its share of N
and its character set, the coordinates read as numbers, the raw text of
coordinates that are not numbers, which coordinates were given, the
processid as a dictionary code (equal ids, equal codes: GX fingerprints a
batch by hashing every value, 4 s for 5M id strings), the split and each
image's status. Every expectation is a stock GX
column expectation over those columns, evaluated by GX itself (pandas
engine); the regex ``^[ACGTN]+$`` over a barcode's sorted character set gives
the same verdict as over the barcode (a string matches iff its characters
do), at 5 characters instead of 660 per record. At BIOSCAN-5M's 5.15 million
records the regex over full barcodes alone took 44 s and 11 GB here.

Each expectation carries ``meta={"rule": key}``; the stage reports GX's
counts per rule and cross-checks them against the row-level reasons.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls from a data stage

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from g2p.config import ValidateConfig  # noqa: E402
from g2p.data.layout import SPLITS  # noqa: E402

SUITE_NAME = "bioscan5m_records"
DOCS_SITE = "g2p_validation"
# Result format: counts plus a few unexpected values per expectation for Data
# Docs. Row-level reasons come from the rules, not from GX's index lists,
# which would be millions of Python dicts at full scale.
RESULT_FORMAT: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 10}


@dataclass(frozen=True)
class Rule:
    """One expectation: ``key`` names it in reasons and the summary; ``column`` is
    the record's own column it judges (the derived frame's column may differ)."""

    key: str
    column: str
    expectation: Any  # a gx.expectations.Expectation


def _rule(key: str, judges: str, expectation: type, **kwargs: Any) -> Rule:
    return Rule(key, judges, expectation(**kwargs, meta={"rule": key, "judges": judges}))


def build_rules(cfg: ValidateConfig) -> list[Rule]:
    """The suite, in the order the summary lists it."""
    E = gxe
    rules = [
        _rule("processid.present", "processid", E.ExpectColumnValuesToNotBeNull, column="processid_code",
              description="every record has a processid (judged on its dictionary code)"),
        _rule("processid.unique", "processid", E.ExpectColumnValuesToBeUnique, column="processid_code",
              description="processids are unique: equal ids share a code; every copy of a duplicate is rejected"),
        _rule("split.known", "split", E.ExpectColumnValuesToBeInSet, column="split", value_set=list(SPLITS),
              description="split is an official BIOSCAN-5M split"),
        _rule("dna_barcode.alphabet", "dna_barcode", E.ExpectColumnValuesToMatchRegex,
              column="barcode_charset", regex="^[ACGTN]+$",
              description="normalised barcode uses only ACGTN (regex over its sorted character set)"),
        _rule("dna_barcode.length", "dna_barcode", E.ExpectColumnValuesToBeBetween, column="barcode_length",
              min_value=cfg.min_length, max_value=cfg.max_length,
              description="normalised barcode length in nucleotides"),
        _rule("dna_barcode.n_fraction", "dna_barcode", E.ExpectColumnValuesToBeBetween, column="n_fraction",
              min_value=0.0, max_value=cfg.max_n_fraction, description="share of N in the normalised barcode"),
        _rule("coord-lat.numeric", "coord-lat", E.ExpectColumnValuesToBeNull, column="coord-lat_unparsed",
              description="latitude text that is not a number"),
        _rule("coord-lon.numeric", "coord-lon", E.ExpectColumnValuesToBeNull, column="coord-lon_unparsed",
              description="longitude text that is not a number"),
        _rule("coord-lat.range", "coord-lat", E.ExpectColumnValuesToBeBetween, column="coord-lat",
              min_value=-90.0, max_value=90.0, description="latitude in degrees"),
        _rule("coord-lon.range", "coord-lon", E.ExpectColumnValuesToBeBetween, column="coord-lon",
              min_value=-180.0, max_value=180.0, description="longitude in degrees"),
        _rule("coordinates.both_or_neither", "coord-lat/coord-lon", E.ExpectColumnPairValuesToBeEqual,
              column_A="coord-lat_given", column_B="coord-lon_given",
              description="latitude and longitude are given together or not at all (none: unknown place)"),
    ]
    if cfg.check_images:
        rules += [
            _rule("image.present", "image", E.ExpectColumnValuesToNotBeInSet, column="image",
                  value_set=["missing"], description="the record's image file exists"),
            _rule("image.decodable", "image", E.ExpectColumnValuesToNotBeInSet, column="image",
                  value_set=["corrupt"], description="the image opens and decodes (PIL)"),
        ]
    return rules


@dataclass(frozen=True)
class SuiteResult:
    success: bool
    per_rule: dict[str, dict[str, Any]]  # key -> unexpected_count, element_count, success, ...
    statistics: dict[str, Any]
    data_docs: Path | None  # index.html


def run_suite(frame: pd.DataFrame, rules: list[Rule], docs_dir: Path | None) -> SuiteResult:
    """Run the suite over the derived frame through a Checkpoint whose action
    builds Data Docs under ``docs_dir`` (none when ``docs_dir`` is None)."""
    store = {"class_name": "TupleFilesystemStoreBackend",
             "base_directory": str(Path(docs_dir).resolve()) if docs_dir is not None else ""}
    sites = {} if docs_dir is None else {DOCS_SITE: {
        "class_name": "SiteBuilder", "store_backend": store,
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }}
    ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites, analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
    ))
    batch = (ctx.data_sources.add_pandas("bioscan5m").add_dataframe_asset("records")
             .add_batch_definition_whole_dataframe("all_records"))
    suite = ctx.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for r in rules:  # a copy: an expectation belongs to one suite, and rules may be reused
        exp = copy.copy(r.expectation)
        exp.id = None
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="validate_records", data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])] if sites else []
    cp = ctx.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[vd], actions=actions, result_format=RESULT_FORMAT))
    result = cp.run(batch_parameters={"dataframe": frame})
    (vr,) = result.run_results.values()
    per_rule: dict[str, dict[str, Any]] = {}
    for er in vr.results:
        cfg = er.expectation_config
        key = cfg.meta["rule"]
        if er.exception_info and er.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX could not evaluate {key}: {er.exception_info.get('exception_message')}")
        res = er.result
        per_rule[key] = {
            "expectation": cfg.type,
            "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("result_format", "batch_id")},
            "success": bool(er.success),
            "element_count": int(res.get("element_count", len(frame))),
            "unexpected_count": int(res.get("unexpected_count", 0)),
            "unexpected_percent": float(res.get("unexpected_percent") or 0.0),
            "partial_unexpected_list": [_plain(v) for v in res.get("partial_unexpected_list", [])[:10]],
        }
    index = docs_dir / "index.html" if docs_dir is not None else None
    return SuiteResult(bool(vr.success), per_rule, dict(vr.statistics), index)


def _plain(v: Any) -> Any:
    """A JSON-safe copy of one unexpected value (numpy scalars, tuples of pairs)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
