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
# Series other exporters publish, named as they publish them: kube-state-metrics (replica counts),
# NVIDIA dcgm-exporter's default counters (GPU panels), and vLLM's engine metrics (rollout
# engines, re-exported on the rollout's /metrics) as the pinned vLLM 0.32 names them; a live
# scrape of them is tests/service/test_rollout_vllm_metrics.py.
EXTERNAL_RE = re.compile(r"\b(kube_[a-z0-9_]+|DCGM_FI_[A-Z0-9_]+|vllm:[a-z0-9_:]+)")
EXTERNAL_SERIES = {
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_ready",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_preemptions_total",
}


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


def referenced_external(expr: str) -> set[str]:
    return set(EXTERNAL_RE.findall(re.sub(r'"[^"]*"', '""', expr)))


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
        pytest.param(lambda d: d["panels"][1]["fieldConfig"]["defaults"].update(unit="none"), id="unit-none"),
        pytest.param(lambda d: d["panels"][1]["fieldConfig"]["defaults"].pop("unit"), id="no-unit"),
        pytest.param(
            lambda d: d["templating"].update(list=[v for v in d["templating"]["list"] if v["name"] != "release"]),
            id="no-release-variable",
        ),
        pytest.param(lambda d: d["templating"]["list"][2].update(allValue="$__all"), id="all-not-regex"),
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
        names, external = referenced(expr), referenced_external(expr)
        assert names or external, (where, expr)
        assert names <= known, f"{where}: unknown series {sorted(names - known)} in {expr!r}"
        assert external <= EXTERNAL_SERIES, f"{where}: unknown exporter series {sorted(external - EXTERNAL_SERIES)}"


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


def test_every_query_is_scoped_to_the_chosen_namespace_and_release() -> None:
    # Two releases in one namespace must not be summed together: every selector filters on the
    # variables (DCGM series carry the pod, not the release; kube-state-metrics the Deployment).
    selector = re.compile(r"\b(asyncopd_[a-z0-9_]+|up|vllm:[a-z0-9_:]+|DCGM_FI_[A-Z0-9_]+|kube_[a-z0-9_]+)(\{[^}]*\})?")
    dashboard = load_dashboard()
    assert {"namespace", "release", "replica"} <= {v["name"] for v in dashboard["templating"]["list"]}
    for where, expr in dashboard_exprs(dashboard):
        for name, matchers in selector.findall(expr):
            assert 'namespace=~"$namespace"' in matchers, (where, name, expr)
            if name.startswith("DCGM_FI_"):
                assert 'pod=~"$release' in matchers, (where, expr)
            elif name.startswith("kube_"):
                assert 'deployment=~"$release' in matchers, (where, expr)
            else:
                assert 'release=~"$release"' in matchers, (where, name, expr)
    per_replica = [(w, e) for w, e in dashboard_exprs(dashboard) if "by (le, replica)" in e or "by (replica)" in e]
    assert per_replica
    for where, expr in per_replica:
        assert 'replica=~"$replica"' in expr, (where, expr)


def _quantity(expr: str) -> str:
    if "histogram_quantile" in expr and "_seconds_bucket" in expr:
        return "seconds"
    if "bytes" in expr and "_bytes_bucket" not in expr:
        return "bytes"
    return "other"


def test_one_quantity_per_panel_axis() -> None:
    # Bytes next to samples, or seconds next to errors/s, on one axis hides one of them.
    for panel in load_dashboard()["panels"]:
        quantities = {_quantity(t["expr"]) for t in panel.get("targets", [])}
        assert len(quantities) <= 1, (panel["title"], quantities)


def test_dashboard_has_gpu_engine_replica_and_step_time_panels() -> None:
    dashboard = load_dashboard()
    external = set().union(*(referenced_external(e) for _, e in dashboard_exprs(dashboard)))
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= external
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_preemptions_total"} <= external
    assert "vllm:kv_cache_usage_perc" in external
    # vLLM < 0.10's name for it: the pinned release never records it, so a query on it is dead.
    assert "vllm:gpu_cache_usage_perc" not in external
    titles = {p["title"]: p for p in dashboard["panels"]}
    for role in ("Rollout", "Teacher"):
        exprs = [t["expr"] for t in titles[f"{role} replicas: desired vs ready"]["targets"]]
        assert any("kube_deployment_spec_replicas" in e for e in exprs), role
        assert any("kube_deployment_status_replicas_ready" in e for e in exprs), role
    step = titles["Learner step time"]
    assert step["fieldConfig"]["defaults"]["unit"] == "s"
    assert "asyncopd_learner_step_phase_seconds_sum" in step["targets"][0]["expr"]
