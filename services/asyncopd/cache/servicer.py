"""The cache service's gRPC servicer: parse and validate a request, call the store, build the reply.

Every put is validated in full (shapes, ids < vocab, finite log-probs, versions not from the
future, sizes) before the store sees any of it, so a bad request stores nothing. Validated
records are re-encoded with the configured log-prob dtype and kept as serialized protobuf
bytes (raw tensors inside, no second codec); batches are rebuilt from those bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from asyncopd.cache.prompts import PromptCatalog
from asyncopd.cache.store import CacheUnavailable, ExperienceStore, PutOutcome, StoredRollout
from asyncopd.observability import metrics
from asyncopd.v1 import cache_pb2, cache_pb2_grpc
from asyncopd.wire.convert import (
    Limits,
    LogprobDType,
    prompt_to_proto,
    rollout_from_proto,
    scores_from_proto,
)
from asyncopd.wire.errors import WireError
from asyncopd.wire.rpc import status_errors
from asyncopd.wire.tensors import DTYPE_NAMES, encode

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Tensor fields of Rollout / TeacherScores and how they are stored (the record attributes
# have the same names as the message fields).
_ID_FIELDS = ("prompt_ids", "response_ids", "versions", "support_ids", "topk_ids")
_LOGPROB_FIELDS = ("behavior_logprobs", "support_logprobs", "token_logprobs", "topk_logprobs", "tail_logmass")


def compact_bytes(msg: Any, record: object, logprob_dtype: LogprobDType) -> bytes:
    """The validated message as stored: ids int32, log-probs in `logprob_dtype`.

    Tensors already in the stored dtype keep their bytes (no decode/re-encode round trip);
    others are re-encoded from the validated record. Mutates `msg` (the request's own copy).
    """
    for name in _ID_FIELDS + _LOGPROB_FIELDS:
        if not hasattr(record, name) or not msg.HasField(name):
            continue
        is_ids = name in _ID_FIELDS
        tensor = getattr(msg, name)
        if tensor.dtype != DTYPE_NAMES["int32" if is_ids else logprob_dtype]:
            value = np.asarray(getattr(record, name))
            tensor.CopyFrom(encode(value.astype(np.int32), None) if is_ids else encode(value, logprob_dtype))
    return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class ServicerLimits:
    """Request limits and the storage dtype (from `CacheConfig`)."""

    vocab_size: int | None
    logprob_dtype: LogprobDType = "float16"
    max_request_bytes: int = 48 << 20
    max_items: int = 4096
    max_wait_ms: int = 10000
    max_prompt_tokens: int = 32768
    max_response_tokens: int = 32768


def unavailable(method: F) -> F:
    """Redis outages past the retry window become UNAVAILABLE (clients retry later)."""

    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except CacheUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper  # type: ignore[return-value]


def _name(value: str, field: str) -> str:
    if not value:
        raise WireError(f"{field}: must not be empty")
    if len(value) > 256:
        raise WireError(f"{field}: {len(value)} characters, at most 256")
    return value


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Thin adapter between the wire protocol and `ExperienceStore`."""

    def __init__(
        self,
        store: ExperienceStore,
        catalog: PromptCatalog,
        limits: ServicerLimits,
        recorder: metrics.CacheMetrics | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.limits = limits
        self.m = recorder

    # -- helpers ------------------------------------------------------------------------------

    def _count(self, field: str, n: int, what: str) -> None:
        if n < 1:
            raise WireError(f"{field}: must be >= 1, got {n}")
        if n > self.limits.max_items:
            raise WireError(f"{field}: {n} {what} exceed the limit of {self.limits.max_items} per request")

    def _wait(self, field: str, wait_ms: int) -> int:
        if wait_ms < 0:
            raise WireError(f"{field}: must be >= 0, got {wait_ms}")
        return min(wait_ms, self.limits.max_wait_ms)

    def _size(self, request: Any) -> None:
        size = request.ByteSize()
        if size > self.limits.max_request_bytes:
            raise WireError(
                f"request is {size} bytes, more than the limit of {self.limits.max_request_bytes} "
                "(cache.max_request_mb); send fewer items per request"
            )

    def _wire_limits(self, max_version: int | None) -> Limits:
        return Limits(
            vocab_size=self.limits.vocab_size,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_response_tokens=self.limits.max_response_tokens,
            max_version=max_version,
        )

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.m is not None:
            self.m.request_seconds.observe(time.perf_counter() - start)

    def _record_put(self, out: PutOutcome) -> None:
        if self.m is None:
            return
        if out.stale:
            self.m.dropped.labels(reason="stale").inc(out.stale)
        if out.lost:
            self.m.dropped.labels(reason="lost").inc(out.lost)
        if out.evicted:
            policy = self.store.policy.eviction
            self.m.evictions.labels(policy=policy).inc(out.evicted)
            self.m.evicted_bytes.labels(policy=policy).inc(out.evicted_bytes)
            self.m.dropped.labels(reason="evicted").inc(out.evicted - out.evicted_stale)
            self.m.dropped.labels(reason="stale").inc(out.evicted_stale)

    # -- RPCs ---------------------------------------------------------------------------------

    @unavailable
    @status_errors
    def AcquirePrompts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        replica = _name(request.replica, "replica")
        self._count("max_prompts", request.max_prompts, "prompts")
        wait_ms = self._wait("wait_ms", request.wait_ms)
        got = self.store.acquire(replica, request.max_prompts, wait_ms)
        resp = cache_pb2.AcquirePromptsResponse(learner_version=got.version, finished=got.finished)
        for adm in got.tickets:
            resp.prompts.append(prompt_to_proto(self.catalog.prompt(adm.pos, adm.ticket, got.version)))
        if self.m is not None:
            self.m.admitted.inc(len(got.tickets))
            if len(got.tickets) < request.max_prompts and not got.finished:
                self.m.admission_blocked.inc()
            if got.reissued_expired:
                self.m.redeliveries.labels(queue="admitted").inc(got.reissued_expired)
        return resp

    @unavailable
    @status_errors
    def ReleasePrompts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        replica = _name(request.replica, "replica")
        if len(request.tickets) > self.limits.max_items:
            raise WireError(f"tickets: {len(request.tickets)} exceed the limit of {self.limits.max_items}")
        tickets = [_name(t, f"tickets[{i}]") for i, t in enumerate(request.tickets)]
        return cache_pb2.ReleasePromptsResponse(released=self.store.release(replica, tickets))

    @unavailable
    @status_errors
    def PutRollouts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self._timed():
            self._size(request)
            self._count("rollouts", len(request.rollouts), "rollouts")
            # The learner broadcasts weights v + 1 to the replicas before it publishes v + 1 here,
            # so a fast replica may legitimately answer with tokens one version ahead.
            published = self.store.version()
            limits = self._wire_limits(max_version=None)
            stored, seen = [], set()
            for i, msg in enumerate(request.rollouts):
                field = f"rollouts[{i}]"
                r = rollout_from_proto(msg, limits, field)
                newest = int(r.versions.max())
                if newest > published + 1:
                    raise WireError(
                        f"{field}.versions: version {newest} is from the future (the learner published "
                        f"{published}; tokens may carry at most {published + 1})"
                    )
                _name(r.ticket, f"{field}.ticket")
                if r.sample_id in seen:
                    raise WireError(f"{field}.sample_id: {r.sample_id!r} appears twice in this request")
                seen.add(r.sample_id)
                blob = compact_bytes(msg, r, self.limits.logprob_dtype)
                k = 0 if r.support_ids is None else int(r.support_ids.shape[1])
                stored.append(StoredRollout(r.sample_id, r.ticket, r.oldest_version, r.num_tokens, k, blob))
            out = self.store.put_rollouts(stored)
        if self.m is not None:
            self.m.produced.inc(out.accepted)
            self._record_put(out)
        return cache_pb2.PutRolloutsResponse(accepted=out.accepted, duplicates=out.duplicates)

    @unavailable
    @status_errors
    def ClaimRollouts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        teacher = _name(request.teacher, "teacher")
        self._count("max_rollouts", request.max_rollouts, "rollouts")
        wait_ms = self._wait("wait_ms", request.wait_ms)
        claimed = self.store.claim_rollouts(teacher, request.max_rollouts, wait_ms)
        resp = cache_pb2.ClaimRolloutsResponse()
        for blob in claimed.blobs:
            resp.rollouts.add().ParseFromString(blob)
        if self.m is not None:
            if claimed.redelivered:
                self.m.redeliveries.labels(queue="scoring").inc(claimed.redelivered)
            if claimed.stale_dropped:
                self.m.dropped.labels(reason="stale").inc(claimed.stale_dropped)
        return resp

    @unavailable
    @status_errors
    def PutScores(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self._timed():
            self._size(request)
            self._count("scores", len(request.scores), "scores")
            sids = [_name(s.sample_id, f"scores[{i}].sample_id") for i, s in enumerate(request.scores)]
            if len(set(sids)) != len(sids):
                raise WireError("scores: a sample_id appears twice in this request")
            shapes = self.store.sample_shapes(sids)
            limits = self._wire_limits(max_version=None)
            items = []
            for i, msg in enumerate(request.scores):
                shape = shapes.get(msg.sample_id)
                if shape is None:  # unknown, already scored, or gone: late work, ignored and counted
                    items.append((msg.sample_id, b""))
                    continue
                t, k = shape
                if k == 0 and msg.HasField("support_logprobs"):
                    raise WireError(f"scores[{i}].support_logprobs: given, but the rollout carries no support")
                s = scores_from_proto(msg, limits, t, k or None, f"scores[{i}]")
                items.append((s.sample_id, compact_bytes(msg, s, self.limits.logprob_dtype)))
            out = self.store.put_scores(items)
        if self.m is not None:
            self.m.scored.inc(out.accepted)
            self._record_put(out)
        return cache_pb2.PutScoresResponse(accepted=out.accepted, duplicates=out.duplicates)

    @unavailable
    @status_errors
    def PullBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        policy = self.store.policy
        cap = (policy.max_staleness + 1) * policy.batch_size
        if request.size < 1:
            raise WireError(f"size: must be >= 1, got {request.size}")
        if request.size > cap:
            raise WireError(
                f"size: {request.size} can never be served; admission keeps at most "
                f"(max_staleness + 1) * learner.batch_size = {cap} samples in flight"
            )
        if request.learner_version < 0:
            raise WireError(f"learner_version: {request.learner_version} is negative")
        learner = _name(request.learner or "learner", "learner")
        wait_ms = self._wait("wait_ms", request.wait_ms)
        out = self.store.pull_batch(request.size, request.learner_version, learner, wait_ms)
        resp = cache_pb2.PullBatchResponse()
        if self.m is not None:
            self.m.learner_version.set(out.version)
            if out.stale_dropped:
                self.m.dropped.labels(reason="stale").inc(out.stale_dropped)
            if out.returned:
                self.m.redeliveries.labels(queue="batched").inc(out.returned)
        if out.batch is None:
            return resp
        resp.batch_id = out.batch.batch_id
        for (r, s), stale in zip(out.batch.samples, out.batch.staleness, strict=True):
            sample = resp.samples.add()
            sample.rollout.ParseFromString(r)
            sample.scores.ParseFromString(s)
            resp.staleness.append(stale)
        if self.m is not None:
            self.m.batches.inc()
            for stale in out.batch.staleness:
                self.m.staleness.observe(stale)
            self.m.batch_max_staleness.set(max(out.batch.staleness))
        return resp

    @unavailable
    @status_errors
    def AckBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        trained = self.store.ack_batch(_name(request.batch_id, "batch_id"))
        if self.m is not None:
            self.m.trained.inc(trained)
        return cache_pb2.AckBatchResponse(trained=trained)

    @unavailable
    @status_errors
    def PublishVersion(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        version = self.store.publish_version(request.version, request.finished)
        if self.m is not None:
            self.m.learner_version.set(version)
        return cache_pb2.PublishVersionResponse(version=version)

    @unavailable
    @status_errors
    def Stats(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        s = self.store.stats()
        return cache_pb2.StatsResponse(
            learner_version=s.learner_version,
            admitted=s.admitted,
            produced=s.produced,
            trained=s.trained,
            dropped=s.dropped,
            in_flight=s.in_flight,
            bytes_held=s.bytes_held,
            byte_budget=s.byte_budget,
            queue_depth=s.queue_depth,
            staleness_served=s.staleness_served,
            evictions=s.evictions,
            max_staleness=s.max_staleness,
            redis_errors=s.redis_errors,
            counters=s.counters,
            finished=s.finished,
        )
