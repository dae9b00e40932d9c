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
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from asyncopd.observability.metrics import RolloutMetrics
from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.engine import Engine
from asyncopd.rollout.sampling import Sampling
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import Outage
from asyncopd.wire.work_loop import Claimed, Ended, run_work_loop

log = logging.getLogger(__name__)

_THROUGHPUT_WINDOW_S = 30.0


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
        tokens = sum(r.num_tokens for r in rollouts)
        now = time.monotonic()
        with self._stats_lock:
            self._generated += tokens
            self._recent.append((now, tokens))
        if self._metrics is not None:
            self._metrics.generated_tokens.inc(tokens)
            self._metrics.samples.inc(len(rollouts))
            self._metrics.generation_seconds.observe(elapsed)
        return rollouts

    def load_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The weight-update hook (weightsync subscriber, PushWeights): pause, load, resume."""
        start = time.monotonic()
        tensors = list(named_tensors)
        self._paused = True
        try:
            self.engine.load_weights(version, tensors)
        finally:
            self._paused = False
        if self._metrics is not None:
            self._metrics.weight_update_seconds.observe(time.monotonic() - start)
            self._metrics.weight_update_bytes.inc(sum(t.numel() * t.element_size() for _, t in tensors))
            self._metrics.policy_version.set(version)
        log.info("replica %s loaded weights version %d (%d tensors)", self.name, version, len(tensors))

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
    """Acquire → generate → put, until the cache says finished or `stop` is set."""

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
    ) -> None:
        self._replica = replica
        self._cache = cache
        self._sampling = sampling
        self._support_kind = support_kind
        self._k = k
        self._batch_size = batch_size
        self._wait_ms = wait_ms
        self._metrics = metrics
        self.rollouts_put = 0

    def run(self, stop: threading.Event) -> None:
        name = self._replica.name
        ended = run_work_loop(
            stop,
            Outage(f"{name}: the cache"),
            claim=self._acquire,
            work=lambda prompts: self._replica.generate(prompts, self._sampling, self._support_kind, self._k),
            put=self._put,
            give_back=self._release,
            settled=self._idle,
        )
        if ended is Ended.FINISHED:
            log.info("cache reports the run finished; rollout loop of %s exits", name)

    def _acquire(self) -> Claimed[Prompt]:
        start = time.monotonic()
        prompts, _, finished = self._cache.acquire_prompts(self._replica.name, self._batch_size, self._wait_ms)
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
