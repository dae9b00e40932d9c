"""The cache service's gRPC servicer: parse the request, call the store, build the reply.

Parsing and validation are `asyncopd.cache.requests`' (a bad request stores nothing), the rules
are `asyncopd.cache.policy`'s, the state is `asyncopd.cache.store`'s, and every event goes to a
`Recorder` (a no-op one when the cache has no metrics). This module only wires them together.

Payloads: clients that reach Redis send and receive metadata only (`by_reference`, `metas`);
for the others (the inline path) the servicer turns stored frames back into messages here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from asyncopd.cache.policy import FromTheFuture
from asyncopd.cache.prompts import PromptCatalog
from asyncopd.cache.recorder import NullRecorder, Recorder
from asyncopd.cache.requests import RequestParser, ServicerLimits, name
from asyncopd.cache.shards import ShardedStore
from asyncopd.cache.store import CacheUnavailable, ExperienceStore, PayloadRef, SampleMeta, StoredRollout
from asyncopd.cache.waits import Waits
from asyncopd.v1 import cache_pb2, cache_pb2_grpc
from asyncopd.v1 import common_pb2 as pb
from asyncopd.wire import payload
from asyncopd.wire.convert import (
    Limits,
    cursor_from_proto,
    cursor_to_proto,
    prompt_to_proto,
    rollout_to_proto,
    scores_to_proto,
)
from asyncopd.wire.errors import WireError
from asyncopd.wire.rpc import status_errors

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


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


def _ref(ref: PayloadRef) -> Any:
    return cache_pb2.PayloadRef(key=ref.key, nbytes=ref.nbytes, checksum=ref.checksum)


# The most batches a learner may keep claimed awaiting its checkpoint (PullBatch.keep_batch_ids).
MAX_KEPT_BATCHES = 4096


def _epoch(value: int) -> int:
    if value < 0:
        raise WireError(f"learner_epoch: {value} is negative")
    return value


# The most tickets a learner may name as trained since its checkpoint (PromptCursor.trained_tickets).
MAX_TRAINED_TICKETS = 1 << 20


def _names(ids: Any, field: str, cap: int) -> list[str]:
    """A learner's list of batch ids or tickets: at most `cap`, each a valid name."""
    if len(ids) > cap:
        raise WireError(f"{field}: {len(ids)} entries, at most {cap}")
    return [name(b, field) for b in ids]


def _batch_ids(ids: Any, field: str) -> list[str]:
    return _names(ids, field, MAX_KEPT_BATCHES)


def rollout_meta(m: SampleMeta) -> Any:
    return cache_pb2.RolloutMeta(
        sample_id=m.sample_id,
        ticket=m.ticket,
        oldest_version=m.oldest_version,
        newest_version=m.newest_version,
        num_tokens=m.num_tokens,
        support_size=m.support_size,
        payload=_ref(m.rollout),
    )


def scores_meta(m: SampleMeta) -> Any:
    assert m.scores is not None
    return cache_pb2.ScoresMeta(
        sample_id=m.sample_id, num_tokens=m.num_tokens, support_size=m.support_size, payload=_ref(m.scores)
    )


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Thin adapter between the wire protocol and `ExperienceStore`."""

    def __init__(
        self,
        store: ExperienceStore | ShardedStore,
        catalog: PromptCatalog,
        limits: ServicerLimits,
        recorder: Recorder | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.parse = RequestParser(limits, store.staleness)
        self.recorder: Recorder = recorder or NullRecorder()
        self._dtype = limits.logprob_dtype
        # waiting requests hold worker threads: bounded, and ended when their caller goes away
        self.waits = Waits(limits.max_waiting, store.wake_waiters, self.recorder.waiting, self.recorder.wait_cut)

    def _inline(self, metas: list[SampleMeta], scores: bool) -> tuple[list[Any], dict[str, str]]:
        """Messages of stored frames (inline path), and sid -> reason for frames unreadable."""
        keys = [m.rollout.key for m in metas] + ([m.scores.key for m in metas if m.scores] if scores else [])
        frames = self.store.read_frames(keys)
        out, refused = [], {}
        for i, m in enumerate(metas):
            try:
                r_frame = frames[i]
                if r_frame is None:
                    raise payload.PayloadError("rollout frame gone", "payload_missing")
                r = payload.decode_rollout(r_frame, Limits(), sample_id=m.sample_id, checksum=m.rollout.checksum)
                msg: Any = rollout_to_proto(r, self._dtype)
                if scores:
                    s_frame, ref = frames[len(metas) + i], m.scores
                    if s_frame is None or ref is None:
                        raise payload.PayloadError("scores frame gone", "payload_missing")
                    k = m.support_size or None
                    sc = payload.decode_scores(
                        s_frame, Limits(), sample_id=m.sample_id, num_tokens=m.num_tokens, support_size=k,
                        checksum=ref.checksum,
                    )  # fmt: skip
                    msg = pb.ScoredSample(rollout=msg, scores=scores_to_proto(sc, self._dtype))
                out.append(msg)
            except payload.PayloadError as exc:
                refused[m.sample_id] = exc.reason
        return out, refused

    @unavailable
    @status_errors
    def AcquirePrompts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        replica = name(request.replica, "replica")
        want = self.parse.count("max_prompts", request.max_prompts, "prompts")
        with self.waits.slot(context, self.parse.wait_ms("wait_ms", request.wait_ms)) as (wait_ms, gone):
            got = self.store.acquire(replica, want, wait_ms, gone)
        self.recorder.admitted(got, want)
        prompts = [prompt_to_proto(self.catalog.prompt(a.pos, a.ticket, got.version)) for a in got.tickets]
        return cache_pb2.AcquirePromptsResponse(prompts=prompts, learner_version=got.version, finished=got.finished)

    @unavailable
    @status_errors
    def ReleasePrompts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        released = self.store.release(name(request.replica, "replica"), self.parse.tickets(request))
        return cache_pb2.ReleasePromptsResponse(released=released)

    def _rollouts(self, request: Any) -> list[StoredRollout]:
        """The request's rollouts, their token versions checked against the newest learner version
        this process knows (no Redis round trip); one that looks from the future is checked again
        against the published version, read from Redis (another cache process may have seen it)."""
        try:
            return self.parse.rollouts(request, published=self.store.known_version())
        except FromTheFuture:
            return self.parse.rollouts(request, published=self.store.version())

    @unavailable
    @status_errors
    def PutRollouts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.recorder.timed():
            out = self.store.put_rollouts(self._rollouts(request))
        self.recorder.rollouts_put(out)
        return cache_pb2.PutRolloutsResponse(accepted=out.accepted, duplicates=out.duplicates)

    @unavailable
    @status_errors
    def ClaimRollouts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        teacher = name(request.teacher, "teacher")
        want = self.parse.count("max_rollouts", request.max_rollouts, "rollouts")
        with self.waits.slot(context, self.parse.wait_ms("wait_ms", request.wait_ms)) as (wait_ms, gone):
            claimed = self.store.claim_rollouts(teacher, want, wait_ms, gone)
        self.recorder.claimed(claimed)
        if request.by_reference:
            return cache_pb2.ClaimRolloutsResponse(metas=[rollout_meta(m) for m in claimed.samples])
        rollouts, refused = self._inline(claimed.samples, scores=False)
        self.store.refuse_unscored(refused)
        return cache_pb2.ClaimRolloutsResponse(rollouts=rollouts)

    @unavailable
    @status_errors
    def PutScores(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.recorder.timed():
            refused = self.parse.refused(request.refused)
            scores = self.parse.scores(request, self.store.sample_shapes)
            self.store.refuse_unscored(refused)
            out = self.store.put_scores(scores)
        self.recorder.scores_put(out)
        return cache_pb2.PutScoresResponse(accepted=out.accepted, duplicates=out.duplicates)

    @unavailable
    @status_errors
    def PullBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        keep = _batch_ids(request.keep_batch_ids, "keep_batch_ids")
        size, version, learner, asked_ms = self.parse.pull(request)
        with self.waits.slot(context, asked_ms) as (wait_ms, gone):
            out = self.store.pull_batch(
                size, version, learner, wait_ms, epoch=_epoch(request.learner_epoch), keep=keep, gone=gone
            )
        self.recorder.pulled(out)
        runs, held = self.store.run_state()
        resp = cache_pb2.PullBatchResponse(runs=list(runs), admission_held=held)
        if out.batch is None:
            return resp
        resp.batch_id = out.batch.batch_id
        if request.by_reference:
            for m, stale in zip(out.batch.samples, out.batch.staleness, strict=True):
                resp.refs.add(rollout=rollout_meta(m), scores=scores_meta(m), staleness=stale)
            return resp
        samples, refused = self._inline(out.batch.samples, scores=True)
        self.store.note_refused(out.batch.batch_id, refused)
        resp.samples.extend(samples)
        pairs = zip(out.batch.samples, out.batch.staleness, strict=True)
        resp.staleness.extend(st for m, st in pairs if m.sample_id not in refused)
        return resp

    @unavailable
    @status_errors
    def AckBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        refused = self.parse.refused(request.refused)
        epoch = _epoch(request.learner_epoch)
        trained = self.store.ack_batch(name(request.batch_id, "batch_id"), refused, epoch=epoch)
        self.recorder.trained(trained)
        return cache_pb2.AckBatchResponse(trained=trained)

    @unavailable
    @status_errors
    def PublishVersion(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        version = self.store.publish_version(request.version, request.finished, epoch=_epoch(request.learner_epoch))
        self.recorder.published(version)
        return cache_pb2.PublishVersionResponse(version=version)

    @unavailable
    @status_errors
    def BeginLearner(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        learner = name(request.learner or "learner", "learner")
        if request.checkpoint_version < 0:
            raise WireError(f"checkpoint_version: {request.checkpoint_version} is negative")
        saved = cursor_from_proto(request.cursor) if request.HasField("cursor") else None
        start = self.store.begin_learner(request.has_checkpoint, request.checkpoint_version, saved)
        self.recorder.published(start.published)
        log.info(
            "learner %s began: epoch %d, published version %d, starts at %d, %d prompt positions re-opened",
            learner, start.epoch, start.published, start.start_version, start.cursor_restored,
        )  # fmt: skip
        return cache_pb2.BeginLearnerResponse(
            learner_epoch=start.epoch,
            published_version=start.published,
            start_version=start.start_version,
            cursor_restored=start.cursor_restored,
        )

    @unavailable
    @status_errors
    def PromptCursor(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        trained = _batch_ids(request.trained_batch_ids, "trained_batch_ids")
        tickets = _names(request.trained_tickets, "trained_tickets", MAX_TRAINED_TICKETS)
        saved = cursor_from_proto(request.saved) if request.HasField("saved") else None
        state = self.store.cursor_state(_epoch(request.learner_epoch), trained, saved, tickets)
        return cache_pb2.PromptCursorResponse(cursor=cursor_to_proto(state))

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
            staleness_window=s.staleness_window,
        )
