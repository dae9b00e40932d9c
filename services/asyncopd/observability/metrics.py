"""The catalogue of every Prometheus metric AsyncOPD records, and the HTTP endpoint that serves them.

One process = one service replica = one `ServiceRegistry`. The registry stamps the process's
constant labels (`service`, `replica`) onto every sample when it is scraped, so metric objects
carry only the labels that vary inside a process (`reason`, `policy`, `queue`, `phase`,
`estimator`). Per-service classes create their metrics in that registry; services import the
class for themselves and record into its attributes::

    from asyncopd.observability import metrics

    registry = metrics.ServiceRegistry(service="cache", replica=name)
    m = metrics.CacheMetrics(registry, eviction_policy=config.cache.eviction)
    server = metrics.MetricsServer(registry, config.cache.server.metrics_port, config.cache.server.host)
    m.produced.inc(len(rollouts))
    m.dropped.labels(reason="stale").inc()
    m.queue_depth.labels(queue="unscored").set(n)
    m.staleness.observe(learner_version - min_token_version)
    ...
    server.stop()  # on shutdown; `start_metrics_server(port, host, registry=...)` -> port never stops

The catalogue itself is `catalogue()` (name, type, help, labels of every metric); the
dashboard/rule tests check every query against it, and docs/observability.md lists it.

Naming rules (tests enforce them): every name starts with `asyncopd_<service>_`; counters end in
`_total`; durations are histograms in seconds (`_seconds`), sizes in bytes (`_bytes`);
staleness is a histogram in learner versions. Labels stay low-cardinality: never a sample,
prompt or batch id. Known label values are created at zero when the class is built, so every
series exists (and `rate()` works) from the first scrape.

Tests that run several services in one process give each its own `ServiceRegistry`; nothing
here registers in prometheus_client's global default registry. A rollout replica reads from it:
vLLM records its engine metrics there (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:num_preemptions_total`, ...), and `ReexportedFamilies(VLLM_PREFIX)` in the rollout's
registry serves them on the same /metrics, stamped with the same `service` and `replica`.

This module knows metric names, types, help and buckets. It does not know when a service
records them (the services do), nor how Prometheus scrapes them (deploy/prometheus/ and
`asyncopd.lab.prometheus_local`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# `*_created` series double the exposition and nothing here reads them (process-wide switch).
disable_created_metrics()

# Seconds, from a 1 ms RPC to a 2 min generation of long answers on CPU.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Learner versions. `le="0"` counts on-policy samples exactly (staleness is an integer).
STALENESS_BUCKETS: Final = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0)
# Samples per batch (teacher scoring batches, learner batches).
BATCH_SIZE_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)

CONST_LABELS: Final = ("service", "replica")
SERVICES: Final = ("rollout", "teacher", "cache", "learner", "autoscaler")

# Label values created at zero up front. A service may record other values; these are the ones
# dashboards and alerts name.
DROP_REASONS: Final = ("stale", "evicted", "lost", "invalid", "expired", "poison")
# Cache queues as the store reports them: prompts leased to / waiting re-issue from rollouts,
# rollouts waiting for (unscored) or held by (scoring) a teacher, scored samples ready, samples
# claimed in a batch the learner has not acked.
CACHE_QUEUES: Final = ("prompts_leased", "prompts_reissue", "unscored", "scoring", "scored", "claimed")
# Leases that expire and are handed out again: prompts, teacher claims, learner batches.
REDELIVERY_QUEUES: Final = ("admitted", "scoring", "batched")
LEARNER_PHASES: Final = ("data_wait", "compute", "weight_sync")
REDIS_ERROR_REASONS: Final = ("connection", "timeout", "response")
# Metric-name prefix of vLLM's engine metrics (vllm.v1.metrics.loggers.PrometheusStatLogger).
VLLM_PREFIX: Final = "vllm:"


class ServiceRegistry(CollectorRegistry):
    """A registry that adds `service` and `replica` to every sample it exposes.

    The metric objects themselves never declare those labels; registering a metric that does
    is an error, so a constant label cannot be set twice with two values.
    """

    def __init__(self, service: str, replica: str, *, process_metrics: bool = True) -> None:
        if service not in SERVICES:
            raise ValueError(f"service must be one of {SERVICES}, got {service!r}")
        if not replica:
            raise ValueError("replica must be a non-empty name (e.g. 'rollout-0')")
        super().__init__(auto_describe=True)
        self.service = service
        self.replica = replica
        self._const = {"service": service, "replica": replica}
        if process_metrics:
            # CPU, RSS, open fds of this process: what a "service down/leaking" panel needs.
            ProcessCollector(registry=self)

    def register(self, collector: Collector) -> None:
        clash = set(getattr(collector, "_labelnames", ())) & set(CONST_LABELS)
        if clash:
            name = getattr(collector, "_name", collector)
            raise ValueError(f"{name}: labels {sorted(clash)} are set by ServiceRegistry, not by a metric")
        super().register(collector)

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            family.samples = [s._replace(labels={**self._const, **s.labels}) for s in family.samples]
            yield family


class ReexportedFamilies(Collector):
    """The families of another registry whose names start with `prefix`, collected on each scrape.

    For a library that records into prometheus_client's default registry (vLLM does, for its
    engine metrics) while the service serves its own `ServiceRegistry`: registered there, the
    library's families appear on the service's /metrics with the service's constant labels.
    Families that do not exist yet (no engine built) are simply absent from that scrape.
    """

    def __init__(self, prefix: str, source: CollectorRegistry = REGISTRY) -> None:
        if not prefix:
            raise ValueError("prefix must be non-empty: re-exporting a whole registry duplicates process_* series")
        self.prefix = prefix
        self._source = source

    def describe(self) -> list[Metric]:
        # The names are the library's and appear only once it has built its metrics; describing
        # none keeps the registry from reserving (or checking) names at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name.startswith(self.prefix):
                yield family


def _counter(registry: CollectorRegistry, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
    if not name.endswith("_total"):
        raise ValueError(f"counter {name} must end in _total")
    # prometheus_client appends _total itself when exposing; give it the base name.
    return Counter(name.removesuffix("_total"), doc, labelnames=tuple(labels), registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
    return Gauge(name, doc, labelnames=tuple(labels), registry=registry)


def _histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...], labels: Iterable[str] = ()
) -> Histogram:
    return Histogram(name, doc, labelnames=tuple(labels), buckets=buckets, registry=registry)


class RolloutMetrics:
    """A rollout replica: generation throughput and latency, policy version, weight updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.generated_tokens = _counter(
            r, "asyncopd_rollout_generated_tokens_total", "Response tokens generated by the student."
        )
        self.samples = _counter(r, "asyncopd_rollout_samples_total", "Rollouts (responses) generated and sent.")
        self.generation_seconds = _histogram(
            r, "asyncopd_rollout_generation_seconds", "Wall time of one engine generate() call.", LATENCY_BUCKETS
        )
        self.policy_version = _gauge(
            r, "asyncopd_rollout_policy_version", "Learner version of the weights the engine holds now."
        )
        self.weight_update_seconds = _histogram(
            r,
            "asyncopd_rollout_weight_update_seconds",
            "Receive + load time of one new weight version.",
            LATENCY_BUCKETS,
        )
        self.weight_update_bytes = _counter(
            r, "asyncopd_rollout_weight_update_bytes_total", "Bytes of weights received from the learner."
        )
        self.engine_queue_depth = _gauge(
            r, "asyncopd_rollout_engine_queue_depth", "Prompts acquired and waiting for or in generation."
        )
        self.admission_wait_seconds = _counter(
            r,
            "asyncopd_rollout_admission_wait_seconds_total",
            "Time spent waiting for the cache to admit prompts (rate = fraction of time blocked).",
        )
        self.version_lag = _gauge(
            r,
            "asyncopd_rollout_version_lag",
            "Published learner version minus the version of the weights this replica holds (as it last heard).",
        )
        self.lag_gated = _gauge(
            r,
            "asyncopd_rollout_lag_gated",
            "One while the replica acquires no prompts because its weights lag by more than the staleness bound.",
        )


class TeacherMetrics:
    """A teacher replica: scoring throughput, latency, batch size, idle time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.scored_tokens = _counter(r, "asyncopd_teacher_scored_tokens_total", "Response tokens scored.")
        self.scored_samples = _counter(r, "asyncopd_teacher_scored_samples_total", "Rollouts scored.")
        self.scoring_seconds = _histogram(
            r, "asyncopd_teacher_scoring_seconds", "Wall time of scoring one batch (prefill + top-k).", LATENCY_BUCKETS
        )
        self.batch_size = _histogram(
            r, "asyncopd_teacher_batch_size", "Rollouts per scoring batch.", BATCH_SIZE_BUCKETS
        )
        self.claim_wait_seconds = _counter(
            r,
            "asyncopd_teacher_claim_wait_seconds_total",
            "Time spent waiting for unscored rollouts (rate = idle fraction).",
        )


class CacheMetrics:
    """The cache service: sample accounting, queues, bytes vs budget, evictions, staleness served.

    Accounting invariant the counters make checkable:
    produced = trained + sum(dropped by reason) + in_flight.
    """

    def __init__(self, registry: CollectorRegistry, *, eviction_policy: str = "stalest-first") -> None:
        r = registry
        self.admitted = _counter(r, "asyncopd_cache_admitted_prompts_total", "Prompts handed to rollout replicas.")
        self.admission_blocked = _counter(
            r,
            "asyncopd_cache_admission_blocked_total",
            "Prompt requests refused because admitting more would exceed the staleness bound or capacity.",
        )
        self.produced = _counter(r, "asyncopd_cache_produced_samples_total", "Rollouts stored.")
        self.scored = _counter(r, "asyncopd_cache_scored_samples_total", "Teacher scores stored.")
        self.trained = _counter(r, "asyncopd_cache_trained_samples_total", "Samples the learner acked (trained on).")
        self.dropped = _counter(r, "asyncopd_cache_dropped_samples_total", "Samples discarded, by reason.", ["reason"])
        self.in_flight = _gauge(
            r, "asyncopd_cache_in_flight_samples", "Produced samples neither trained nor dropped yet."
        )
        self.unaccounted = _gauge(
            r,
            "asyncopd_cache_unaccounted_samples",
            "Produced - trained - dropped - in flight, in the Redis snapshot: 0 while the accounting invariant holds.",
        )
        self.queue_depth = _gauge(r, "asyncopd_cache_queue_depth", "Items waiting in each queue.", ["queue"])
        self.redeliveries = _counter(
            r,
            "asyncopd_cache_redeliveries_total",
            "Leased items handed out again after their lease expired, by queue.",
            ["queue"],
        )
        self.bytes = _gauge(r, "asyncopd_cache_bytes", "Bytes of samples and scores held in Redis.")
        self.budget_bytes = _gauge(r, "asyncopd_cache_budget_bytes", "Configured byte budget.")
        self.evictions = _counter(
            r, "asyncopd_cache_evictions_total", "Samples evicted to stay within budget, by policy.", ["policy"]
        )
        self.evicted_bytes = _counter(
            r, "asyncopd_cache_evicted_bytes_total", "Bytes evicted to stay within budget, by policy.", ["policy"]
        )
        self.staleness = _histogram(
            r,
            "asyncopd_cache_staleness",
            "Staleness (learner version - oldest token version) of each sample served in a batch.",
            STALENESS_BUCKETS,
        )
        self.batch_max_staleness = _gauge(
            r, "asyncopd_cache_batch_max_staleness", "Largest staleness in the last batch served."
        )
        self.max_staleness = _gauge(r, "asyncopd_cache_max_staleness", "Configured staleness bound.")
        self.learner_version = _gauge(
            r, "asyncopd_cache_learner_version", "Latest learner version published to the cache."
        )
        self.batches = _counter(r, "asyncopd_cache_batches_total", "Batches served to the learner.")
        self.redis_errors = _counter(
            r, "asyncopd_cache_redis_errors_total", "Failed Redis operations, by reason.", ["reason"]
        )
        self.redis_state = _gauge(
            r,
            "asyncopd_cache_redis_state_losses",
            "Times Redis lost cache state in this run, from its own counters: 'reset' (came back empty or "
            "went back in time) and 'rollback' (came back with fewer writes than a cache process saw).",
            ["reason"],
        )
        self.tokens_reserved = _gauge(
            r,
            "asyncopd_cache_tokens_reserved",
            "Tokens admission holds for open tickets (Redis's cnt.tok_reserved, all shards), against "
            "asyncopd_cache_token_budget.",
        )
        self.token_budget = _gauge(
            r, "asyncopd_cache_token_budget", "Configured cache.max_tokens_in_flight (0 = no token budget)."
        )
        self.masked_samples = _gauge(
            r,
            "asyncopd_cache_masked_samples",
            "Samples served in this run with tokens beyond the staleness bound, which the learner masks "
            "(stale_tokens: mask; Redis's cnt.masked_samples, all shards).",
        )
        self.waiting_requests = _gauge(
            r,
            "asyncopd_cache_waiting_requests",
            "AcquirePrompts/ClaimRollouts/PullBatch requests waiting at this cache process now (each holds a gRPC "
            "worker thread while it waits).",
        )
        self.waits_cut = _counter(
            r,
            "asyncopd_cache_waits_cut_total",
            "Waiting requests answered at once because as many as cache.server.workers allow were waiting already "
            "(a fleet larger than this cache's workers: raise them).",
        )
        self.request_seconds = _histogram(
            r,
            "asyncopd_cache_request_seconds",
            "Handling time of a cache RPC (excluding long-poll waits).",
            LATENCY_BUCKETS,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for queue in CACHE_QUEUES:
            self.queue_depth.labels(queue=queue)
        for queue in REDELIVERY_QUEUES:
            self.redeliveries.labels(queue=queue)
        for reason in REDIS_ERROR_REASONS:
            self.redis_errors.labels(reason=reason)
        self.evictions.labels(policy=eviction_policy)
        self.evicted_bytes.labels(policy=eviction_policy)
        for reason in ("reset", "rollback"):
            self.redis_state.labels(reason=reason)


class LearnerMetrics:
    """The learner: steps, version, tokens, loss and estimator diagnostics, step-time split, broadcast.

    The estimator label is fixed per process (one learner trains with one estimator), so the
    loss/KL gauges are already bound to it: `m.loss.set(x)`.
    """

    def __init__(self, registry: CollectorRegistry, *, estimator: str) -> None:
        r = registry
        self.estimator = estimator
        self.steps = _counter(r, "asyncopd_learner_steps_total", "Optimizer steps taken.")
        self.policy_version = _gauge(r, "asyncopd_learner_policy_version", "Current policy version (= steps).")
        self.target_steps = _gauge(r, "asyncopd_learner_target_steps", "Steps the run is configured to take.")
        self.trained_tokens = _counter(
            r, "asyncopd_learner_trained_tokens_total", "Response tokens in trained batches."
        )
        self.trained_samples = _counter(r, "asyncopd_learner_trained_samples_total", "Samples in trained batches.")
        self.batch_size = _histogram(r, "asyncopd_learner_batch_size", "Samples per pulled batch.", BATCH_SIZE_BUCKETS)
        self.loss = _gauge(r, "asyncopd_learner_loss", "Loss of the last step.", ["estimator"]).labels(
            estimator=estimator
        )
        self.kl = _gauge(
            r, "asyncopd_learner_kl", "KL(student, teacher) estimate of the last step.", ["estimator"]
        ).labels(estimator=estimator)
        self.importance_ratio_mean = _gauge(
            r, "asyncopd_learner_importance_ratio_mean", "Mean per-token ratio pi/mu of the last step."
        )
        self.importance_ratio_max = _gauge(
            r, "asyncopd_learner_importance_ratio_max", "Largest per-token ratio pi/mu of the last step."
        )
        self.masked_fraction = _gauge(
            r, "asyncopd_learner_masked_fraction", "Fraction of tokens masked out (M2PO) in the last step."
        )
        self.clipped_fraction = _gauge(
            r, "asyncopd_learner_clipped_fraction", "Fraction of tokens clipped (PPO/decoupled) in the last step."
        )
        self.grad_norm = _gauge(r, "asyncopd_learner_grad_norm", "Global gradient norm before clipping.")
        self.step_phase_seconds = _histogram(
            r,
            "asyncopd_learner_step_phase_seconds",
            "Time of each phase of a step: data_wait (blocked on the cache), compute, weight_sync.",
            LATENCY_BUCKETS,
            ["phase"],
        )
        self.broadcast_seconds = _histogram(
            r, "asyncopd_learner_broadcast_seconds", "Wall time of broadcasting one weight version.", LATENCY_BUCKETS
        )
        self.broadcast_bytes = _counter(
            r, "asyncopd_learner_broadcast_bytes_total", "Bytes of weights broadcast (once per version)."
        )
        self.broadcast_receivers = _gauge(
            r, "asyncopd_learner_broadcast_receivers", "Rollout replicas in the current broadcast group."
        )
        self.eval_accuracy = _gauge(r, "asyncopd_learner_eval_accuracy", "Greedy accuracy of the last evaluation.")
        self.acks_refused = _counter(
            r,
            "asyncopd_learner_acks_refused_total",
            "Batch acks the cache refused (it lost or expired the claim): trained samples it counts otherwise.",
        )
        self.checkpoint_unixtime = _gauge(
            r, "asyncopd_learner_checkpoint_unixtime", "Unix time of the last checkpoint written (0 before the first)."
        )
        self.checkpoint_failures = _counter(
            r, "asyncopd_learner_checkpoint_failures_total", "Checkpoints that failed to write (disk full, I/O error)."
        )
        for phase in LEARNER_PHASES:
            self.step_phase_seconds.labels(phase=phase)

    def phase(self, name: str) -> Histogram:
        """The histogram child of one step phase: `with m.phase("compute").time(): ...`."""
        return self.step_phase_seconds.labels(phase=name)


class AutoscalerMetrics:
    """The autoscaler: what it sees and what it decided."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.desired_replicas = _gauge(
            r, "asyncopd_autoscaler_desired_replicas", "Rollout replicas the autoscaler asks for."
        )
        self.decisions = _counter(r, "asyncopd_autoscaler_decisions_total", "Scaling decisions, by reason.", ["reason"])
        for reason in ("learner_starved", "admission_blocked", "bounds", "steady"):
            self.decisions.labels(reason=reason)


METRIC_CLASSES: Final = {
    "rollout": RolloutMetrics,
    "teacher": TeacherMetrics,
    "cache": CacheMetrics,
    "learner": LearnerMetrics,
    "autoscaler": AutoscalerMetrics,
}


@dataclass(frozen=True)
class MetricInfo:
    """One catalogue entry: the name as Prometheus sees it (counters with `_total`)."""

    service: str
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]


def catalogue() -> list[MetricInfo]:
    """Every AsyncOPD metric (not process_* ones), built in scratch registries."""
    out: list[MetricInfo] = []
    for service in METRIC_CLASSES:
        registry = ServiceRegistry(service, "catalogue", process_metrics=False)
        if service == "learner":
            LearnerMetrics(registry, estimator="reverse_kl_mc")
        else:
            METRIC_CLASSES[service](registry)  # type: ignore[call-arg]
        for family in CollectorRegistry.collect(registry):
            name = family.name + "_total" if family.type == "counter" else family.name
            labels = sorted({k for s in family.samples for k in s.labels if k != "le"})
            out.append(MetricInfo(service, name, family.type, family.documentation, tuple(labels)))
    return out


class MetricsServer:
    """A /metrics HTTP endpoint on a daemon thread, stoppable by handle (tests, clean shutdown)."""

    def __init__(self, registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1") -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_metrics_server(port: int = 0, host: str = "127.0.0.1", *, registry: CollectorRegistry) -> int:
    """Serve `registry` at http://host:port/metrics for the life of the process; returns the bound port.

    Port 0 picks a free port. Processes that must stop the endpoint earlier use `MetricsServer`.
    """
    return MetricsServer(registry, port, host).port
