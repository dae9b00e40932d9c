"""The Grafana dashboard passes the project's schema, lays out cleanly, and reads only real series.

"Real" means: every metric a dashboard query or a Prometheus rule names is in the catalogue of
asyncopd.observability.metrics (histograms via _bucket/_sum/_count), a recording rule, or Prometheus's `up`.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from asyncopd.observability import metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncopd.json"
SCHEMA = ROOT / "deploy" / "grafana" / "dashboard.schema.json"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
NAME_RE = re.compile(r"\b(asyncopd[a-z0-9_:]*|up)\b")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("record") or rule["alert"], rule["expr"]))
    return out


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def known_series() -> set[str]:
    names = {"up"} | recorded_names()
    for entry in metrics.catalogue():
        names.add(entry.name)
        if entry.kind == "histogram":
            names |= {f"{entry.name}_bucket", f"{entry.name}_sum", f"{entry.name}_count"}
    return names


def referenced(expr: str) -> set[str]:
    # Label values such as queue="unscored" are quoted; strip strings before looking for names.
    return set(NAME_RE.findall(re.sub(r'"[^"]*"', '""', expr)))


def test_dashboard_passes_schema() -> None:
    errors = sorted(validator().iter_errors(load_dashboard()), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["templating"].update(list=[]), id="no-datasource-variable"),
        pytest.param(lambda d: d["panels"][1].update(datasource={"type": "prometheus", "uid": "prom"}), id="fixed-uid"),
        pytest.param(lambda d: d["panels"][1].pop("targets"), id="panel-without-query"),
        pytest.param(lambda d: d["panels"][1]["gridPos"].update(w=25), id="too-wide"),
        pytest.param(lambda d: d["panels"][1]["targets"][0].update(expr=""), id="empty-expr"),
        pytest.param(lambda d: d.update(colour="blue"), id="unknown-key"),
    ],
)
def test_schema_rejects_broken_dashboards(mutate: Any) -> None:
    broken = copy.deepcopy(load_dashboard())
    assert broken["panels"][1]["type"] != "row"
    mutate(broken)
    assert list(validator().iter_errors(broken))


def test_panel_ids_unique_and_layout_without_overlap() -> None:
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_series_named_by_dashboard_and_rules_exists() -> None:
    known = known_series()
    exprs = dashboard_exprs(load_dashboard()) + rule_exprs()
    assert exprs
    for where, expr in exprs:
        names = referenced(expr)
        assert names, (where, expr)
        assert names <= known, f"{where}: unknown series {sorted(names - known)} in {expr!r}"


def test_dashboard_covers_what_operators_need() -> None:
    names = set().union(*(referenced(e) for _, e in dashboard_exprs(load_dashboard())))
    required = {
        "asyncopd_cache_staleness_bucket",  # staleness distribution
        "asyncopd_cache_batch_max_staleness",  # max ...
        "asyncopd_cache_max_staleness",  # ... vs bound
        "asyncopd_rollout_generated_tokens_total",  # throughput of each stage
        "asyncopd_teacher_scored_tokens_total",
        "asyncopd_learner_trained_tokens_total",
        "asyncopd_learner_trained_samples_total",  # end-to-end
        "asyncopd_learner_step_phase_seconds_sum",  # learner idle fraction
        "asyncopd_cache_queue_depth",
        "asyncopd_cache_bytes",
        "asyncopd_cache_budget_bytes",
        "asyncopd_cache_evictions_total",
        "asyncopd_learner_broadcast_seconds_bucket",  # weight-sync time
        "asyncopd_learner_loss",
        "asyncopd_learner_kl",
        "asyncopd_learner_eval_accuracy",
    }
    assert required <= names, sorted(required - names)


def test_every_catalogued_metric_is_on_the_dashboard_or_in_a_rule() -> None:
    used = set().union(*(referenced(e) for _, e in dashboard_exprs(load_dashboard()) + rule_exprs()))
    unused = []
    for entry in metrics.catalogue():
        variants = {entry.name, f"{entry.name}_bucket", f"{entry.name}_sum", f"{entry.name}_count"}
        if not variants & used:
            unused.append(entry.name)
    assert not unused, f"metrics nobody looks at: {unused}"


def test_helm_chart_ships_the_same_dashboard() -> None:
    chart_copy = ROOT / "charts" / "asyncopd" / "dashboards" / "asyncopd.json"
    if not chart_copy.parent.is_dir():
        pytest.skip("no Helm chart in this checkout")
    assert json.loads(chart_copy.read_text()) == load_dashboard(), (
        "charts/asyncopd/dashboards/asyncopd.json differs from deploy/grafana/asyncopd.json: copy it over"
    )


def test_docs_list_every_metric() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    missing = [e.name for e in metrics.catalogue() if f"`{e.name}`" not in doc]
    assert not missing, f"docs/observability.md lacks {missing}"
