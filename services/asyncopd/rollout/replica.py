"""A rollout replica's domain logic: one engine shared by direct requests and the cache loop.

`RolloutReplica` serializes generation calls on the engine (an engine runs one batch at a
time), records throughput and metrics, and applies weight updates (which do NOT wait for a
running generation: engines switch weights between two decode steps). `RolloutLoop` is the
pull loop (`asyncopd.wire.work_loop`): acquire prompts from the cache (admission control),
generate, put the rollouts, give back the tickets of work it will not finish, and exit when
the cache says the run is over.

It knows the engine interface and the cache client; it knows nothing of gRPC servers.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import torch

from asyncopd.observability.metrics import RolloutMetrics
from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.engine import Engine
from asyncopd.rollout.sampling import Sampling
from asyncopd.weightsync.receive import WeightStream
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import Outage, retryable
from asyncopd.wire.work_loop import Claimed, Ended, put_with_backoff, run_work_loop

log = logging.getLogger(__name__)

_THROUGHPUT_WINDOW_S = 30.0
_EMPTY_ADMISSION_BACKOFF_S = 0.05  # continuous mode: the cache had nothing; ask again after this


def _prompt_of(rollout: Rollout) -> Prompt:
    """The admitted prompt a rollout answers (what giving its ticket back needs)."""
    return Prompt(prompt_id=rollout.prompt_id, prompt_ids=rollout.prompt_ids, ticket=rollout.ticket, task=rollout.task)


@dataclass(frozen=True)
class ReplicaStatus:
    """What `Status` reports."""

    replica: str
    version: int
    tokens_per_second: float
    generated_tokens: int
    engine: str
    paused: bool


class RolloutReplica:
    """The engine plus the bookkeeping every caller of it shares."""

    def __init__(self, engine: Engine, name: str, metrics: RolloutMetrics | None = None) -> None:
        self.engine = engine
        self.name = name
        self._metrics = metrics
        self._generate_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._generated = 0
        self._paused = False
        if metrics is not None:
            metrics.policy_version.set(engine.version)

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int
    ) -> list[Rollout]:
        self.engine.check_request(prompts, support_kind, k)  # reject before queueing behind others
        with self._generate_lock:
            start = time.monotonic()
            rollouts = self.engine.generate(prompts, sampling, support_kind, k)
            elapsed = time.monotonic() - start
        self._count(rollouts)
        if self._metrics is not None:
            self._metrics.generation_seconds.observe(elapsed)
        return rollouts

    def submit(self, prompts: Sequence[Prompt], sampling: Sampling, support_kind: SupportKind, k: int) -> None:
        """Continuous generation (streaming engines): start `prompts` alongside what is decoding."""
        self.engine.submit(prompts, sampling, support_kind, k)

    def poll(self) -> list[Rollout]:
        """One decode step of the submitted requests; the rollouts that finished in it."""
        rollouts = self.engine.poll()
        self._count(rollouts)
        return rollouts

    def _count(self, rollouts: Sequence[Rollout]) -> None:
        if not rollouts:
            return
        tokens = sum(r.num_tokens for r in rollouts)
        now = time.monotonic()
        with self._stats_lock:
            self._generated += tokens
            self._recent.append((now, tokens))
        if self._metrics is not None:
            self._metrics.generated_tokens.inc(tokens)
            self._metrics.samples.inc(len(rollouts))

    def load_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The weight-update hook (weightsync subscriber, PushWeights): pause, load, resume."""
        start = time.monotonic()
        # A WeightStream is loaded as it arrives (its tensors are reused buffers: never listed).
        tensors = named_tensors if isinstance(named_tensors, WeightStream) else list(named_tensors)
        self._paused = True
        try:
            self.engine.load_weights(version, tensors)
        finally:
            self._paused = False
        if isinstance(tensors, WeightStream):
            count, nbytes = len(tensors.specs), tensors.received_bytes
        else:
            count, nbytes = len(tensors), sum(t.numel() * t.element_size() for _, t in tensors)
        if self._metrics is not None:
            self._metrics.weight_update_seconds.observe(time.monotonic() - start)
            self._metrics.weight_update_bytes.inc(nbytes)
            self._metrics.policy_version.set(version)
        log.info("replica %s loaded weights version %d (%d tensors)", self.name, version, count)

    def status(self) -> ReplicaStatus:
        now = time.monotonic()
        with self._stats_lock:
            while self._recent and now - self._recent[0][0] > _THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            window_tokens = sum(n for _, n in self._recent)
            generated = self._generated
        span = max(now - self._recent[0][0], 1.0) if self._recent else _THROUGHPUT_WINDOW_S
        return ReplicaStatus(
            replica=self.name,
            version=self.engine.version,
            tokens_per_second=window_tokens / span,
            generated_tokens=generated,
            engine=self.engine.info.name,
            paused=self._paused,
        )


class RolloutLoop:
    """Acquire → generate → put, until the cache says finished or `stop` is set.

    Continuous (`continuous=True` and a streaming engine): up to `batch_size` requests are kept
    in flight; the engine is stepped one decode step at a time, each rollout is put as soon as
    it finishes, and free slots are refilled from the cache between steps (without waiting
    while anything is decoding). Otherwise whole batches: acquire `batch_size`, generate them
    all, put them together.
    """

    def __init__(
        self,
        replica: RolloutReplica,
        cache: CacheClient,
        *,
        sampling: Sampling,
        support_kind: SupportKind,
        k: int,
        batch_size: int,
        wait_ms: int = 500,
        metrics: RolloutMetrics | None = None,
        continuous: bool = True,
        max_lag: int | None = None,
    ) -> None:
        """`max_lag`: when the engine's weights are more than this many versions behind the
        published learner version (the staleness bound), everything generated now would be
        dropped as stale on arrival: the loop stops acquiring prompts until weight sync catches
        up (None: never stops)."""
        self._replica = replica
        self._max_lag = max_lag
        self._published = 0  # the newest learner version the cache told this loop of
        self._gated_since: float | None = None
        self._last_probe = 0.0
        self.gated_s = 0.0  # seconds spent not acquiring because the weights lagged
        self._continuous = continuous
        self._cache = cache
        self._sampling = sampling
        self._support_kind = support_kind
        self._k = k
        self._batch_size = batch_size
        self._wait_ms = wait_ms
        self._metrics = metrics
        self.rollouts_put = 0
        self._stop = threading.Event()  # the running loop's stop signal (`run`)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        name = self._replica.name
        if self._continuous and self._replica.engine.streaming:
            ended = self._run_continuous(stop)
        else:
            ended = self._run_batches(stop)
        if ended is Ended.FINISHED:
            log.info("cache reports the run finished; rollout loop of %s exits", name)

    def _run_batches(self, stop: threading.Event) -> Ended:
        name = self._replica.name
        return run_work_loop(
            stop,
            Outage(f"{name}: the cache"),
            claim=self._acquire,
            work=lambda prompts: self._replica.generate(prompts, self._sampling, self._support_kind, self._k),
            put=self._put,
            give_back=self._release,
            settled=self._idle,
        )

    def _run_continuous(self, stop: threading.Event) -> Ended:
        replica, engine = self._replica, self._replica.engine
        outage = Outage(f"{replica.name}: the cache")
        refill = max(1, self._batch_size // 4)  # free slots worth a cache round trip mid-decode
        next_try = 0.0  # after an empty admission, when asking again is worth it
        run_over = False
        undelivered: list[Rollout] = []
        try:
            while not stop.is_set():
                busy = engine.in_flight
                free = self._batch_size - busy
                now = time.monotonic()
                if not run_over and free > 0 and (busy == 0 or (free >= refill and now >= next_try)):
                    try:
                        # Nothing decoding: wait at the cache; otherwise never hold up the engine.
                        claimed = self._acquire(free, self._wait_ms if busy == 0 else 0)
                    except grpc.RpcError as err:
                        if not retryable(err):
                            raise
                        delay = outage.failed(err)
                        if busy == 0:
                            stop.wait(delay)
                            continue
                        next_try = now + delay
                    else:
                        outage.ok()
                        if claimed.items:
                            replica.submit(claimed.items, self._sampling, self._support_kind, self._k)
                        else:
                            run_over = claimed.finished
                            next_try = now + _EMPTY_ADMISSION_BACKOFF_S
                if engine.in_flight == 0:
                    if run_over:
                        return Ended.FINISHED
                    continue
                done = replica.poll()
                if self._metrics is not None:
                    self._metrics.engine_queue_depth.set(engine.in_flight)
                if done:
                    undelivered = done
                    if not put_with_backoff(functools.partial(self._put, done), stop):
                        break
                    undelivered = []
            return Ended.STOPPED
        finally:
            # Stopped or failed: what is decoding and what was not delivered goes back to the cache.
            self._release([*engine.abort_submitted(), *(_prompt_of(r) for r in undelivered)])
            self._idle()

    def _lag(self) -> int:
        return self._published - self._replica.engine.version

    def _lagging(self) -> bool:
        return self._max_lag is not None and self._lag() > self._max_lag

    def _note_published(self, version: int) -> None:
        self._published = max(self._published, version)
        if self._metrics is not None:
            self._metrics.version_lag.set(max(0, self._lag()))

    def _gate(self, gated: bool) -> None:
        now = time.monotonic()
        if gated and self._gated_since is None:
            self._gated_since = now
            log.warning(
                "replica %s: weights version %d lag the published %d by more than %d: not acquiring prompts "
                "until weight sync catches up",
                self._replica.name,
                self._replica.engine.version,
                self._published,
                self._max_lag,
            )
        elif not gated and self._gated_since is not None:
            self.gated_s += now - self._gated_since
            log.info(
                "replica %s caught up (weights %d): acquiring again", self._replica.name, self._replica.engine.version
            )
            self._gated_since = None
        if self._metrics is not None:
            self._metrics.lag_gated.set(int(gated))

    def _wait_for_weights(self, wait_ms: int) -> bool:
        """Gated: wait up to `wait_ms` for the weights to catch up -> finished (the run ended).
        The published version and the finished flag are re-read from the cache's stats at most
        every 2 s (they are not learned from admissions while none are asked for)."""
        deadline = time.monotonic() + wait_ms / 1000.0
        while self._lagging():
            if time.monotonic() - self._last_probe >= 2.0:
                self._last_probe = time.monotonic()
                stats = self._cache.stats_snapshot()
                self._note_published(stats.learner_version)
                if stats.finished:
                    return True
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(left, 0.05)):
                break
        return False

    def _acquire(self, n: int | None = None, wait_ms: int | None = None) -> Claimed[Prompt]:
        wait = self._wait_ms if wait_ms is None else wait_ms
        if self._lagging():
            self._gate(True)
            if self._wait_for_weights(wait):
                return Claimed([], True)
            if self._lagging():
                return Claimed([], False)
        self._gate(False)
        start = time.monotonic()
        prompts, version, finished = self._cache.acquire_prompts(self._replica.name, n or self._batch_size, wait)
        self._note_published(version)
        if prompts and self._lagging():
            # The learner moved past this replica's weights meanwhile: these would be stale on arrival.
            self._release(prompts)
            self._gate(True)
            prompts = []
        if self._metrics is not None:
            self._metrics.admission_wait_seconds.inc(time.monotonic() - start)
            self._metrics.engine_queue_depth.set(len(prompts))
        return Claimed(prompts, finished)

    def _put(self, rollouts: list[Rollout]) -> None:
        self._cache.put_rollouts(rollouts)
        self.rollouts_put += len(rollouts)

    def _idle(self) -> None:
        if self._metrics is not None:
            self._metrics.engine_queue_depth.set(0)

    def _release(self, prompts: Sequence[Prompt]) -> None:
        tickets = [p.ticket for p in prompts if p.ticket]
        if not tickets:
            return
        try:
            self._cache.release_prompts(self._replica.name, tickets)
        except Exception:
            log.exception("could not release %d tickets of %s", len(tickets), self._replica.name)
