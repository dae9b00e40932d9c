"""The fleet's actors: simulated rollout and teacher replicas and a learner stand-in, each a
thread with its own gRPC channel to the real cache service.

The rollout actor runs acquire -> generate -> put (giving tickets back when stopped mid-batch),
the teacher actor claim -> score -> put, the learner stand-in pull (at its version) -> sleep the
simulated step -> ack -> publish the new weights to the replicas, then the version to the cache
(the real learner's order). Every RPC's round-trip time is recorded per method in `RpcTimes`.

It knows the cache client and the simulated engines; it knows nothing of how the benchmark
is reported.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np

from asyncopd.cache.policy import StalenessPolicy
from asyncopd.lab.fleet.engines import SimulatedRollout, SimulatedTeacher, SimulatedWeights
from asyncopd.records import Prompt
from asyncopd.wire.cache_client import CacheClient, CacheFull

log = logging.getLogger(__name__)
T = TypeVar("T")
_MIB = 1 << 20


def fleet_channel(address: str, max_message_mb: int = 256) -> grpc.Channel:
    """A channel with its own connection: gRPC otherwise shares one subchannel per process
    among channels with equal arguments, and the fleet would not be N clients."""
    size = max_message_mb * _MIB
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.insecure_channel(address, options=options)


class RpcTimes:
    """Round-trip times per RPC method, shared by all actors of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def timed(self, method: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[method] += elapsed
                self.calls[method] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {m: {"calls": self.calls[m], "seconds": self.seconds[m]} for m in sorted(self.calls)}


@dataclass
class LearnerLog:
    """What the learner stand-in trained: one entry per step."""

    steps: list[tuple[float, int, int, list[int]]] = field(default_factory=list)  # (t, samples, tokens, staleness)
    start: float = 0.0  # time.monotonic() when the fleet started
    masked_tokens: int = 0  # response tokens beyond the bound, masked (stale_tokens: mask)

    @property
    def staleness(self) -> list[int]:
        return [s for *_, st in self.steps for s in st]


def _put_with_backoff(put: Callable[[], Any], stop: threading.Event) -> bool:
    """Retry a put the cache refuses under backpressure; False if stopped first."""
    delay = 0.02
    while True:
        try:
            put()
            return True
        except CacheFull:
            if stop.wait(delay):
                return False
            delay = min(delay * 2, 1.0)


def rollout_actor(
    engine: SimulatedRollout,
    cache: CacheClient,
    times: RpcTimes,
    stop: threading.Event,
    *,
    batch_size: int,
    wait_ms: int,
) -> None:
    """Acquire -> generate -> put until `stop` or the cache reports the run finished."""
    name = engine.name
    while not stop.is_set():
        prompts, _, finished = times.timed("AcquirePrompts", lambda: cache.acquire_prompts(name, batch_size, wait_ms))
        if not prompts:
            if finished:
                return
            continue
        try:
            rollouts = engine.generate(prompts, stop)
            if not _put_with_backoff(partial(times.timed, "PutRollouts", partial(cache.put_rollouts, rollouts)), stop):
                _release(cache, name, prompts, times)
                return
        except InterruptedError:
            _release(cache, name, prompts, times)
            return


def _release(cache: CacheClient, name: str, prompts: Sequence[Prompt], times: RpcTimes) -> None:
    tickets = [p.ticket for p in prompts if p.ticket]
    if tickets:
        times.timed("ReleasePrompts", lambda: cache.release_prompts(name, tickets))


def teacher_actor(
    teacher: SimulatedTeacher,
    cache: CacheClient,
    times: RpcTimes,
    stop: threading.Event,
    *,
    claim_batch: int,
    wait_ms: int,
) -> None:
    """Claim -> score -> put until `stop`; unscored claims return to the queue after the lease."""
    while not stop.is_set():
        rollouts = times.timed("ClaimRollouts", lambda: cache.claim_rollouts(teacher.name, claim_batch, wait_ms))
        if not rollouts:
            continue
        try:
            scores = teacher.score(rollouts, stop)
        except InterruptedError:
            return
        if not _put_with_backoff(partial(times.timed, "PutScores", partial(cache.put_scores, scores)), stop):
            return


def learner_actor(
    cache: CacheClient,
    weights: SimulatedWeights,
    times: RpcTimes,
    stop: threading.Event,
    record: LearnerLog,
    *,
    batch_size: int,
    step_s: float,
    wait_ms: int,
    mask: StalenessPolicy | None = None,
) -> None:
    """Pull at the learner's version -> simulated step -> ack -> publish, until `stop`. With `mask`
    (stale_tokens: mask) tokens beyond its bound are masked as the learner's collate does: they
    are not counted trained, and a sample's recorded staleness is its oldest trained token's."""
    version = 0
    while not stop.is_set():
        batch = times.timed("PullBatch", partial(cache.pull_batch, batch_size, version, wait_ms, "fleet-learner"))
        if batch is None:
            continue
        if stop.wait(step_s):
            return  # the claim is returned to the pool after cache.batch_claim_s; counted in flight
        times.timed("AckBatch", partial(cache.ack_batch, batch.batch_id))
        tokens = sum(s.rollout.num_tokens for s in batch.samples)
        staleness = list(batch.staleness)
        if mask is not None:  # at the version the batch was pulled (and trained) at
            staleness = []
            for s in batch.samples:
                kept = s.rollout.versions[s.rollout.versions >= mask.oldest_usable(version)]
                record.masked_tokens += s.rollout.num_tokens - int(kept.size)
                tokens -= s.rollout.num_tokens - int(kept.size)
                staleness.append(version - int(np.min(kept)))  # no token left: fail loudly
        version += 1
        record.steps.append((time.monotonic(), len(batch.samples), tokens, staleness))
        weights.publish(version)  # replicas get the weights first, then the cache the version
        times.timed("PublishVersion", partial(cache.publish_version, version))
