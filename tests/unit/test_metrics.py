"""The metric catalogue follows its naming rules, stamps constant labels, and is served over HTTP."""

from __future__ import annotations

import urllib.request

import pytest
from asyncopd.observability import metrics
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.unit

ALLOWED_LABELS = {"reason", "policy", "queue", "phase", "estimator"}


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_catalogue_naming_rules() -> None:
    entries = metrics.catalogue()
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "duplicate metric names"
    assert {e.service for e in entries} == set(metrics.SERVICES)
    for e in entries:
        assert e.name.startswith(f"asyncopd_{e.service}_"), e.name
        assert e.help and e.help[0].isupper(), e.name
        assert set(e.labels) <= ALLOWED_LABELS, (e.name, e.labels)
        if e.kind == "counter":
            assert e.name.endswith("_total"), e.name
        else:
            assert not e.name.endswith("_total"), e.name
        if "seconds" in e.name and e.kind != "counter":
            assert e.kind == "histogram", e.name


def test_issue_metrics_are_catalogued() -> None:
    names = {e.name: e.kind for e in metrics.catalogue()}
    assert names["asyncopd_cache_staleness"] == "histogram"
    assert names["asyncopd_rollout_generated_tokens_total"] == "counter"
    assert names["asyncopd_teacher_scored_tokens_total"] == "counter"
    assert names["asyncopd_learner_trained_tokens_total"] == "counter"
    assert names["asyncopd_cache_dropped_samples_total"] == "counter"
    assert names["asyncopd_learner_broadcast_seconds"] == "histogram"


def test_constant_labels_stamped_on_every_sample() -> None:
    registry = metrics.ServiceRegistry("cache", "cache-7")
    m = metrics.CacheMetrics(registry, eviction_policy="lru")
    m.dropped.labels(reason="stale").inc(3)
    m.staleness.observe(2)
    m.staleness.observe(0)
    samples = _samples(registry)
    assert samples
    for name, labels in samples:
        d = dict(labels)
        assert d["service"] == "cache" and d["replica"] == "cache-7", name
    key = frozenset({"service": "cache", "replica": "cache-7", "reason": "stale"}.items())
    assert samples[("asyncopd_cache_dropped_samples_total", key)] == 3
    le0 = frozenset({"service": "cache", "replica": "cache-7", "le": "0.0"}.items())
    le2 = frozenset({"service": "cache", "replica": "cache-7", "le": "2.0"}.items())
    assert samples[("asyncopd_cache_staleness_bucket", le0)] == 1
    assert samples[("asyncopd_cache_staleness_bucket", le2)] == 2


def test_known_label_values_exist_at_zero() -> None:
    registry = metrics.ServiceRegistry("cache", "c", process_metrics=False)
    metrics.CacheMetrics(registry, eviction_policy="fifo")
    samples = _samples(registry)
    const = {"service": "cache", "replica": "c"}
    for reason in metrics.DROP_REASONS:
        assert samples[("asyncopd_cache_dropped_samples_total", frozenset({**const, "reason": reason}.items()))] == 0
    for queue in metrics.CACHE_QUEUES:
        assert samples[("asyncopd_cache_queue_depth", frozenset({**const, "queue": queue}.items()))] == 0
    assert samples[("asyncopd_cache_evictions_total", frozenset({**const, "policy": "fifo"}.items()))] == 0


def test_learner_estimator_label_is_bound() -> None:
    registry = metrics.ServiceRegistry("learner", "learner-0", process_metrics=False)
    m = metrics.LearnerMetrics(registry, estimator="forward_kl_topk")
    m.loss.set(0.25)
    m.phase("data_wait").observe(0.5)
    samples = _samples(registry)
    const = {"service": "learner", "replica": "learner-0"}
    assert samples[("asyncopd_learner_loss", frozenset({**const, "estimator": "forward_kl_topk"}.items()))] == 0.25
    key = frozenset({**const, "phase": "data_wait"}.items())
    assert samples[("asyncopd_learner_step_phase_seconds_sum", key)] == 0.5


def test_metric_declaring_a_constant_label_is_rejected() -> None:
    registry = metrics.ServiceRegistry("rollout", "r0", process_metrics=False)
    with pytest.raises(ValueError, match="replica"):
        Counter("asyncopd_rollout_bad", "Bad.", labelnames=["replica"], registry=registry)


def test_registry_rejects_unknown_service_and_empty_replica() -> None:
    with pytest.raises(ValueError, match="service must be one of"):
        metrics.ServiceRegistry("trainer", "x")
    with pytest.raises(ValueError, match="replica"):
        metrics.ServiceRegistry("cache", "")


def test_two_services_in_one_process_do_not_share_values() -> None:
    a = metrics.ServiceRegistry("rollout", "rollout-0", process_metrics=False)
    b = metrics.ServiceRegistry("rollout", "rollout-1", process_metrics=False)
    metrics.RolloutMetrics(a).generated_tokens.inc(5)
    metrics.RolloutMetrics(b)
    key_a = frozenset({"service": "rollout", "replica": "rollout-0"}.items())
    key_b = frozenset({"service": "rollout", "replica": "rollout-1"}.items())
    assert _samples(a)[("asyncopd_rollout_generated_tokens_total", key_a)] == 5
    assert _samples(b)[("asyncopd_rollout_generated_tokens_total", key_b)] == 0


def test_metrics_server_serves_and_stops() -> None:
    registry = metrics.ServiceRegistry("teacher", "teacher-0")
    m = metrics.TeacherMetrics(registry)
    m.scored_tokens.inc(42)
    with metrics.MetricsServer(registry, port=0) as server:
        assert server.port > 0
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
    assert 'asyncopd_teacher_scored_tokens_total{replica="teacher-0",service="teacher"} 42.0' in body
    assert "process_resident_memory_bytes" in body
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_start_metrics_server_returns_bound_port() -> None:
    registry = metrics.ServiceRegistry("autoscaler", "a0", process_metrics=False)
    metrics.AutoscalerMetrics(registry).desired_replicas.set(3)
    port = metrics.start_metrics_server(0, "127.0.0.1", registry=registry)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'asyncopd_autoscaler_desired_replicas{replica="a0",service="autoscaler"} 3.0' in body


def test_reexported_families_carry_the_service_labels_and_only_the_prefix() -> None:
    # vLLM records into prometheus_client's default registry; the rollout serves its own.
    library = CollectorRegistry()
    registry = metrics.ServiceRegistry("rollout", "rollout-0", process_metrics=False)
    registry.register(metrics.ReexportedFamilies(metrics.VLLM_PREFIX, library))
    metrics.RolloutMetrics(registry)
    assert not any(name.startswith("vllm:") for name, _ in _samples(registry)), "nothing before the engine exists"
    from prometheus_client import Gauge

    running = Gauge("vllm:num_requests_running", "running", ["model_name", "engine"], registry=library)
    running.labels(model_name="m", engine="0").set(3)
    Counter("vllm:num_preemptions", "preemptions", ["model_name", "engine"], registry=library).labels("m", "0").inc(2)
    Counter("other_library_total", "not vLLM's", registry=library).inc()
    samples = _samples(registry)
    stamped = {"replica": "rollout-0", "service": "rollout", "model_name": "m", "engine": "0"}
    assert samples[("vllm:num_requests_running", frozenset(stamped.items()))] == 3
    assert samples[("vllm:num_preemptions_total", frozenset(stamped.items()))] == 2
    assert not any(name.startswith("other_library") for name, _ in samples)
    own = frozenset({"replica": "rollout-0", "service": "rollout"}.items())
    assert ("asyncopd_rollout_samples_total", own) in samples
    with pytest.raises(ValueError, match="prefix"):
        metrics.ReexportedFamilies("", library)


def test_reexport_reads_the_default_registry_where_vllm_records() -> None:
    from prometheus_client import Gauge

    registry = metrics.ServiceRegistry("rollout", "rollout-1", process_metrics=False)
    registry.register(metrics.ReexportedFamilies(metrics.VLLM_PREFIX))
    gauge = Gauge("vllm:test_reexport_probe", "a probe in the default registry")  # registry=REGISTRY
    try:
        gauge.set(7)
        labels = frozenset({"replica": "rollout-1", "service": "rollout"}.items())
        assert _samples(registry)[("vllm:test_reexport_probe", labels)] == 7
    finally:
        REGISTRY.unregister(gauge)
