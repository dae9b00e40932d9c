"""What the cache service tells its metrics: one call per event, in the store's terms.

`Recorder` is the interface the servicer calls, unconditionally. `NullRecorder` records nothing
(a cache built without a metrics registry); `MetricsRecorder` writes the Prometheus metrics of
`asyncopd.observability.metrics.CacheMetrics`. It knows the store's outcomes and the metric
names; it knows nothing of gRPC or Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

from asyncopd.cache.store import Admitted, Claimed, PullOutcome, PutOutcome, StorePolicy, StoreStats
from asyncopd.observability import metrics


class Recorder(Protocol):
    def timed(self) -> AbstractContextManager[None]:
        """Times the handling of one request (puts; long-poll waits are not timed)."""
        ...

    def admitted(self, got: Admitted, asked: int) -> None: ...

    def rollouts_put(self, out: PutOutcome) -> None: ...

    def scores_put(self, out: PutOutcome) -> None: ...

    def claimed(self, claimed: Claimed) -> None: ...

    def pulled(self, out: PullOutcome) -> None: ...

    def trained(self, n: int) -> None: ...

    def published(self, version: int) -> None: ...

    def redis_error(self, reason: str) -> None: ...

    def waiting(self, n: int) -> None:
        """`n` requests wait at this process now."""
        ...

    def wait_cut(self) -> None:
        """A waiting request was answered at once: no worker thread to spare for its wait."""
        ...

    def refresh(self, stats: StoreStats) -> None:
        """Copy the Redis-held gauges (in flight, bytes, queue depths) into this process."""
        ...


class NullRecorder:
    """Records nothing; the same methods as `MetricsRecorder`."""

    def timed(self) -> AbstractContextManager[None]:
        return nullcontext()

    def admitted(self, got: Admitted, asked: int) -> None:
        pass

    def rollouts_put(self, out: PutOutcome) -> None:
        pass

    def scores_put(self, out: PutOutcome) -> None:
        pass

    def claimed(self, claimed: Claimed) -> None:
        pass

    def pulled(self, out: PullOutcome) -> None:
        pass

    def trained(self, n: int) -> None:
        pass

    def published(self, version: int) -> None:
        pass

    def redis_error(self, reason: str) -> None:
        pass

    def waiting(self, n: int) -> None:
        pass

    def wait_cut(self) -> None:
        pass

    def refresh(self, stats: StoreStats) -> None:
        pass


class MetricsRecorder:
    """Writes each event into `CacheMetrics`; sets the configured gauges on construction."""

    def __init__(self, m: metrics.CacheMetrics, policy: StorePolicy) -> None:
        self.m = m
        self._eviction = policy.eviction
        m.max_staleness.set(policy.max_staleness)
        m.budget_bytes.set(policy.byte_budget)
        m.token_budget.set(policy.max_tokens_in_flight)

    @contextmanager
    def _timer(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.m.request_seconds.observe(time.perf_counter() - start)

    def timed(self) -> AbstractContextManager[None]:
        return self._timer()

    def admitted(self, got: Admitted, asked: int) -> None:
        self.m.admitted.inc(len(got.tickets))
        if len(got.tickets) < asked and not got.finished:
            self.m.admission_blocked.inc()
        if got.reissued_expired:
            self.m.redeliveries.labels(queue="admitted").inc(got.reissued_expired)

    def _put(self, out: PutOutcome) -> None:
        if out.stale:
            self.m.dropped.labels(reason="stale").inc(out.stale)
        if out.lost:
            self.m.dropped.labels(reason="lost").inc(out.lost)
        if out.evicted:
            self.m.evictions.labels(policy=self._eviction).inc(out.evicted)
            self.m.evicted_bytes.labels(policy=self._eviction).inc(out.evicted_bytes)
            self.m.dropped.labels(reason="evicted").inc(out.evicted - out.evicted_stale)
            self.m.dropped.labels(reason="stale").inc(out.evicted_stale)

    def rollouts_put(self, out: PutOutcome) -> None:
        self.m.produced.inc(out.accepted)
        self._put(out)

    def scores_put(self, out: PutOutcome) -> None:
        self.m.scored.inc(out.accepted)
        self._put(out)

    def claimed(self, claimed: Claimed) -> None:
        if claimed.redelivered:
            self.m.redeliveries.labels(queue="scoring").inc(claimed.redelivered)
        if claimed.stale_dropped:
            self.m.dropped.labels(reason="stale").inc(claimed.stale_dropped)
        if claimed.poisoned:
            self.m.dropped.labels(reason="poison").inc(claimed.poisoned)

    def pulled(self, out: PullOutcome) -> None:
        self.m.learner_version.set(out.version)
        if out.stale_dropped:
            self.m.dropped.labels(reason="stale").inc(out.stale_dropped)
        if out.returned:
            self.m.redeliveries.labels(queue="batched").inc(out.returned)
        if out.batch is None:
            return
        self.m.batches.inc()
        for stale in out.batch.staleness:
            self.m.staleness.observe(stale)
        self.m.batch_max_staleness.set(max(out.batch.staleness))

    def trained(self, n: int) -> None:
        self.m.trained.inc(n)

    def published(self, version: int) -> None:
        self.m.learner_version.set(version)

    def redis_error(self, reason: str) -> None:
        self.m.redis_errors.labels(reason=reason).inc()

    def waiting(self, n: int) -> None:
        self.m.waiting_requests.set(n)

    def wait_cut(self) -> None:
        self.m.waits_cut.inc()

    def refresh(self, stats: StoreStats) -> None:
        self.m.in_flight.set(stats.in_flight)
        self.m.unaccounted.set(stats.produced - stats.trained - sum(stats.dropped.values()) - stats.in_flight)
        self.m.bytes.set(stats.bytes_held)
        self.m.learner_version.set(stats.learner_version)
        for queue, depth in stats.queue_depth.items():
            self.m.queue_depth.labels(queue=queue).set(depth)
        self.m.redis_state.labels(reason="reset").set(stats.counters.get("resets", 0))
        self.m.redis_state.labels(reason="rollback").set(stats.counters.get("rollbacks", 0))
        self.m.tokens_reserved.set(stats.counters.get("tok_reserved", 0))
        self.m.masked_samples.set(stats.counters.get("masked_samples", 0))
