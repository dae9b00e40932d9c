"""A real Prometheus (the Debian package) on loopback scrapes a process exposing AsyncOPD metrics.

The exporter here records into the real metric objects of asyncopd.observability.metrics (one registry per
service, as each service process does) from a background thread, at known rates; the test then
asks Prometheus, through its HTTP API, for the series the dashboard and alerts are built on.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncopd.lab.prometheus_local import LocalPrometheus, find_binary
from asyncopd.observability import metrics

pytestmark = pytest.mark.service

TOKENS_PER_ROLLOUT = 48
ROLLOUTS_PER_TICK = 8
TICK_S = 0.05


def require_binary(name: str) -> str:
    """The tool's path; skipped where it is absent, except in CI (sysdeps installs it there)."""
    path = find_binary(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed in CI: deploy/dev/sysdeps.sh must install prometheus")
        pytest.skip(f"{name} not installed (apt-get install prometheus, or bash deploy/dev/sysdeps.sh)")
    return path


class Pipeline:
    """Four 'service processes' in one: each with its own registry and /metrics server."""

    def __init__(self) -> None:
        self.registries = {
            "rollout-0": metrics.ServiceRegistry("rollout", "rollout-0"),
            "teacher-0": metrics.ServiceRegistry("teacher", "teacher-0"),
            "cache": metrics.ServiceRegistry("cache", "cache"),
            "learner": metrics.ServiceRegistry("learner", "learner"),
        }
        self.rollout = metrics.RolloutMetrics(self.registries["rollout-0"])
        self.teacher = metrics.TeacherMetrics(self.registries["teacher-0"])
        self.cache = metrics.CacheMetrics(self.registries["cache"])
        self.learner = metrics.LearnerMetrics(self.registries["learner"], estimator="reverse_kl_mc")
        self.servers = {name: metrics.MetricsServer(reg) for name, reg in self.registries.items()}
        self.stop_event = threading.Event()
        self.started = time.monotonic()
        self.tokens = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def urls(self) -> dict[str, str]:
        return {name: server.url for name, server in self.servers.items()}

    def _run(self) -> None:
        self.cache.max_staleness.set(4)
        self.cache.budget_bytes.set(64 * 2**20)
        self.learner.target_steps.set(1000)
        version = 0
        while not self.stop_event.wait(TICK_S):
            n_tokens = TOKENS_PER_ROLLOUT * ROLLOUTS_PER_TICK
            self.rollout.generated_tokens.inc(n_tokens)
            self.rollout.samples.inc(ROLLOUTS_PER_TICK)
            self.rollout.generation_seconds.observe(0.04)
            self.tokens += n_tokens
            self.teacher.scored_tokens.inc(n_tokens)
            self.teacher.scored_samples.inc(ROLLOUTS_PER_TICK)
            self.teacher.batch_size.observe(ROLLOUTS_PER_TICK)
            self.cache.produced.inc(ROLLOUTS_PER_TICK)
            self.cache.queue_depth.labels(queue="unscored").set(3)
            self.cache.bytes.set(16 * 2**20)
            # Half the served samples are on-policy, half two versions stale.
            for staleness in (0, 2) * (ROLLOUTS_PER_TICK // 2):
                self.cache.staleness.observe(staleness)
            self.cache.batch_max_staleness.set(2)
            self.cache.trained.inc(ROLLOUTS_PER_TICK)
            version += 1
            self.learner.steps.inc()
            self.learner.policy_version.set(version)
            self.rollout.policy_version.set(version - 1)
            self.learner.trained_tokens.inc(n_tokens)
            self.learner.trained_samples.inc(ROLLOUTS_PER_TICK)
            self.learner.loss.set(1.0 / version)
            self.learner.phase("data_wait").observe(TICK_S * 0.2)
            self.learner.phase("compute").observe(TICK_S * 0.7)
            self.learner.phase("weight_sync").observe(TICK_S * 0.1)
            self.learner.broadcast_seconds.observe(TICK_S * 0.1)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def pipeline() -> Iterator[Pipeline]:
    p = Pipeline()
    p.thread.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def prom(pipeline: Pipeline, tmp_path: Path) -> Iterator[LocalPrometheus]:
    binary = require_binary("prometheus")
    with LocalPrometheus.start(pipeline.urls(), tmp_path / "prom", binary=binary, scrape_interval_s=0.5) as p:
        yield p


def wait_for(fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {fn}")
        time.sleep(0.25)


def scalar(prom: LocalPrometheus, expr: str, at: float | None = None) -> float | None:
    result = prom.query(expr, at)
    if not result:
        return None
    assert len(result) == 1, (expr, result)
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value  # NaN until there is data


def test_prometheus_scrapes_every_service_and_answers_key_queries(prom: LocalPrometheus, pipeline: Pipeline) -> None:
    health = wait_for(lambda: (h := prom.targets_health()) and all(v == "up" for v in h.values()) and h)
    assert len(health) == 4

    # Every process's series carry the service/replica labels the process stamped itself.
    up = prom.query('up{job=~"asyncopd-.*"}')
    assert {r["metric"]["job"] for r in up} == {
        "asyncopd-rollout",
        "asyncopd-teacher",
        "asyncopd-cache",
        "asyncopd-learner",
    }
    tokens = wait_for(lambda: prom.query("asyncopd_rollout_generated_tokens_total"))
    assert tokens[0]["metric"]["service"] == "rollout"
    assert tokens[0]["metric"]["replica"] == "rollout-0"

    # Staleness: half 0, half 2 -> p90 interpolates inside the (1, 2] bucket.
    p90 = wait_for(
        lambda: scalar(prom, "histogram_quantile(0.9, sum by (le) (rate(asyncopd_cache_staleness_bucket[10s])))")
    )
    assert 1.0 < p90 <= 2.0, p90
    p50 = scalar(prom, "histogram_quantile(0.5, sum by (le) (rate(asyncopd_cache_staleness_bucket[10s])))")
    assert p50 is not None and p50 <= 1.0, p50

    # Tokens/s as Prometheus sees it vs what the exporter recorded over wall time; wait until the
    # window is full (a rate over a half-empty window under-reads by design).
    wait_for(lambda: (n := scalar(prom, "count_over_time(asyncopd_rollout_generated_tokens_total[4s])")) and n >= 7)
    rate = scalar(prom, "sum(rate(asyncopd_rollout_generated_tokens_total[4s]))")
    assert rate is not None
    recorded_rate = pipeline.tokens / (time.monotonic() - pipeline.started)
    nominal = TOKENS_PER_ROLLOUT * ROLLOUTS_PER_TICK / TICK_S
    assert 0.6 * recorded_rate < rate < 1.4 * nominal, (rate, recorded_rate, nominal)

    # The recording rules from deploy/prometheus/rules are loaded and evaluate on live data.
    rules = prom.api("rules")
    names = {r["name"] for g in rules["groups"] for r in g["rules"]}
    assert {"asyncopd:learner_idle:ratio5m", "AsyncOPDLearnerStarved", "AsyncOPDServiceDown"} <= names
    assert all(r["health"] != "err" for g in rules["groups"] for r in g["rules"]), rules
    idle = wait_for(lambda: scalar(prom, "asyncopd:learner_idle:ratio5m"))
    assert 0.1 < idle < 0.3, idle
    tok_rate = wait_for(lambda: scalar(prom, "asyncopd:rollout_tokens:rate1m"))
    assert tok_rate > 0
    assert scalar(prom, "asyncopd:cache_staleness:bound") == 4
    assert scalar(prom, "asyncopd:cache_fill:ratio") == 0.25


def test_recorded_series_survive_a_restart_for_after_the_run_queries(prom: LocalPrometheus, pipeline: Pipeline) -> None:
    wait_for(lambda: (n := scalar(prom, "count_over_time(asyncopd_learner_policy_version[10s])")) and n >= 3)
    seen_at = time.time()
    version = scalar(prom, "max(asyncopd_learner_policy_version)")
    assert version is not None and version > 0
    assert prom.stop() == 0
    # What `asyncopd run --prometheus` leaves behind can be reopened without any targets.
    with LocalPrometheus.start({}, prom.workdir, binary=require_binary("prometheus")) as again:
        assert again.targets_health() == {}
        past = scalar(again, "max(asyncopd_learner_policy_version)", at=seen_at)
        assert past is not None and 0 < past <= version + 5


def test_dashboard_queries_with_all_selected_answer_on_a_local_run(prom: LocalPrometheus, pipeline: Pipeline) -> None:
    # A local run's series carry no namespace/release labels; the dashboard's filters with "All"
    # selected ('.*') must still match them, or every panel would be empty outside Kubernetes.
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/asyncopd.json").read_text())
    exprs = {p["title"]: p["targets"][0]["expr"] for p in dashboard["panels"] if p.get("targets")}
    wait_for(lambda: (n := scalar(prom, "count_over_time(asyncopd_learner_steps_total[10s])")) and n >= 5)
    for title in ("Steps / s", "Staleness p90", "Learner step time", "Tokens / s per stage", "Cache bytes vs budget"):
        expr = exprs[title]
        for var, value in {"$__rate_interval": "4s", "$namespace": ".*", "$release": ".*", "$replica": ".*"}.items():
            expr = expr.replace(var, value)
        assert 'namespace=~".*"' in expr, (title, expr)
        result = wait_for(lambda e=expr: prom.query(e))
        values = [float(r["value"][1]) for r in result]
        assert values and all(v > 0 for v in values), (title, expr, result)
    # ... and a release that does not exist selects nothing
    assert not prom.query(
        exprs["Steps / s"].replace("$__rate_interval", "4s").replace("$release", "other").replace("$namespace", ".*")
    )
