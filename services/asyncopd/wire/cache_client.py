"""Typed client of the cache service: domain records in, domain records out.

Rollout replicas, teachers and the learner talk to the cache only through this class. It
converts records to and from the wire protocol (validating what comes back with
`asyncopd.wire` Limits), sets deadlines that cover server-side waits, and turns
RESOURCE_EXHAUSTED (the cache is full under backpressure) into `CacheFull` so producers can
back off. Every other gRPC error propagates as `grpc.RpcError`.

Payloads: given a `PayloadStore` (the run's Redis), the client writes its rollouts' and scores'
frames to Redis itself and sends the cache metadata only, and reads claimed rollouts and pulled
batches back from Redis, verifying each frame's checksum and contents. A frame it refuses
(corrupt, invalid, gone) is not returned: a teacher reports it at once (PutScores.refused), the
learner with the batch's ack (AckBatch.refused); the cache counts it dropped with that reason.
Without one, payloads travel inline through the cache RPCs (bounded by gRPC message limits).

It knows the cache service's RPCs and the payload frames; it knows nothing of admission policy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from asyncopd.config import RunConfig
from asyncopd.records import CursorState, Prompt, Rollout, ScoredSample, TeacherScores
from asyncopd.v1 import cache_pb2, cache_pb2_grpc
from asyncopd.wire import payload
from asyncopd.wire.convert import (
    Limits,
    LogprobDType,
    cursor_from_proto,
    cursor_to_proto,
    prompt_from_proto,
    rollout_from_proto,
    rollout_to_proto,
    scored_from_proto,
    scores_to_proto,
)
from asyncopd.wire.payload_store import PayloadStore


class CacheFull(RuntimeError):
    """The cache refused a put because its byte budget is full (backpressure); retry later."""


@dataclass(frozen=True)
class Batch:
    """A claimed batch of scored samples; ack it with `CacheClient.ack_batch(batch_id)`."""

    batch_id: str
    samples: list[ScoredSample]
    staleness: list[int]  # per sample: learner_version - oldest token version
    refused: dict[str, str] = field(default_factory=dict)  # sid -> reason: frames refused (not in samples)


@dataclass(frozen=True)
class LearnerStart:
    """BeginLearner's answer (see the RPC): this learner's fencing epoch, the published version,
    the version to start at and the prompt positions re-opened from its checkpoint."""

    epoch: int
    published: int
    start_version: int
    cursor_restored: int


@dataclass(frozen=True)
class PutResult:
    """How many records a put stored, and how many the cache already had (re-sent work)."""

    accepted: int
    duplicates: int


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's accounting (see the Stats RPC); `as_dict()` for reports."""

    learner_version: int
    admitted: int
    produced: int
    trained: int
    dropped: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    bytes_held: int = 0
    byte_budget: int = 0
    queue_depth: dict[str, int] = field(default_factory=dict)
    staleness_served: dict[int, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    max_staleness: int = 0
    redis_errors: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    staleness_window: int = 0  # (max_staleness + 1) * batch_size, as the cache's policy computes it

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def invariant_holds(self) -> bool:
        """produced = trained + dropped + in_flight."""
        return self.produced == self.trained + self.dropped_total + self.in_flight


class CacheClient:
    """Blocking client of `asyncopd.v1.CacheService` over a channel (see `asyncopd.wire.rpc.channel`).

    `limits` validates what the cache sends back (default: shapes, dtypes and NaN checks only);
    `logprob_dtype` is the wire dtype of log-probs this client sends; `timeout_s` is the
    deadline of each call on top of any server-side wait it asks for; `payloads` (the run's
    Redis) moves payload frames directly, in `payload_dtype` log-probs.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        limits: Limits | None = None,
        logprob_dtype: LogprobDType = "float32",
        timeout_s: float = 30.0,
        *,
        payloads: PayloadStore | None = None,
        payload_dtype: LogprobDType = "float16",
    ) -> None:
        self._stub = cache_pb2_grpc.CacheServiceStub(channel)
        self._limits = limits or Limits()
        self._dtype: LogprobDType = logprob_dtype
        self._timeout = timeout_s
        self.payloads = payloads
        self._payload_dtype: LogprobDType = payload_dtype
        self._refused: dict[str, dict[str, str]] = {}  # batch id -> frames refused, sent with its ack
        self._shapes: dict[str, tuple[int, int]] = {}  # claimed sid -> (T, K), to check scores against
        self._scores_prefix: dict[str, str] = {}  # claimed sid -> key prefix of its scores (its rollout's shard)
        # The fencing epoch of `begin_learner`, sent with every pull, ack and publish (0: unfenced).
        self.learner_epoch = 0
        # what the last PullBatch said of the cache's run state (see `run_state`)
        self._runs: tuple[str, ...] = ()
        self._admission_held = False
        # waiting calls in flight, cancelled by `stop_waiting` (which also ends every later one)
        self._waiting: set[grpc.Future] = set()
        self._waits_stopped = False
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, channel: grpc.Channel, config: RunConfig) -> CacheClient:
        """The client a service of run `config` uses: direct payloads through `config.redis`
        unless `cache.direct_payloads` is off."""
        c = config.cache
        payloads = PayloadStore.from_config(config.redis, c.payload_ttl_s) if c.direct_payloads else None
        return cls(channel, payloads=payloads, payload_dtype=c.logprob_dtype)

    def _call(self, method: Any, request: Any, wait_ms: int = 0) -> Any:
        """One unary call; a waiting one (`wait_ms` > 0) answers None when `stop_waiting` cut it."""
        try:
            if wait_ms <= 0:
                return method(request, timeout=self._timeout)
            call = method.future(request, timeout=self._timeout + wait_ms / 1000.0)
            with self._lock:
                self._waiting.add(call)
                if self._waits_stopped:
                    call.cancel()
            try:
                return call.result()
            except grpc.FutureCancelledError:
                return None
            finally:
                with self._lock:
                    self._waiting.discard(call)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                raise CacheFull(err.details()) from err  # type: ignore[attr-defined]
            raise

    def stop_waiting(self) -> None:
        """Cut every waiting call (AcquirePrompts, ClaimRollouts, PullBatch with a wait) in flight
        and every later one: each returns empty-handed at once, and the cache ends its server-side
        wait without taking anything for it. A service calls this when told to stop, so a long
        wait (seconds, to keep an idle fleet cheap) never delays its shutdown."""
        with self._lock:
            self._waits_stopped = True
            for call in self._waiting:
                call.cancel()

    # -- rollout replicas -------------------------------------------------------------------

    def acquire_prompts(self, replica: str, max_prompts: int, wait_ms: int = 0) -> tuple[list[Prompt], int, bool]:
        """Admit up to `max_prompts` prompts -> (prompts, learner_version, finished)."""
        req = cache_pb2.AcquirePromptsRequest(replica=replica, max_prompts=max_prompts, wait_ms=wait_ms)
        resp = self._call(self._stub.AcquirePrompts, req, wait_ms)
        if resp is None:  # cut by stop_waiting
            return [], 0, False
        prompts = [prompt_from_proto(p, self._limits, f"prompts[{i}]") for i, p in enumerate(resp.prompts)]
        return prompts, int(resp.learner_version), bool(resp.finished)

    def release_prompts(self, replica: str, tickets: Sequence[str]) -> int:
        """Give back tickets this replica will not answer; returns how many were released."""
        req = cache_pb2.ReleasePromptsRequest(replica=replica, tickets=list(tickets))
        return int(self._call(self._stub.ReleasePrompts, req).released)

    def put_rollouts(self, rollouts: Sequence[Rollout]) -> PutResult:
        """Store finished rollouts (queued for teachers). Raises CacheFull under backpressure."""
        if self.payloads is None:
            req = cache_pb2.PutRolloutsRequest(rollouts=[rollout_to_proto(r, self._dtype) for r in rollouts])
        else:
            req = cache_pb2.PutRolloutsRequest(metas=self._write_rollouts(rollouts, self.payloads))
        resp = self._call(self._stub.PutRollouts, req)
        return PutResult(int(resp.accepted), int(resp.duplicates))

    def _write_rollouts(self, rollouts: Sequence[Rollout], store: PayloadStore) -> list[Any]:
        metas, frames = [], []
        for i, r in enumerate(rollouts):
            payload.check_rollout(r, self._limits, f"rollouts[{i}]")
            frame = payload.encode_rollout(r, self._payload_dtype)
            key = store.new_key("r", r.sample_id, payload.frame_prefix(store.prefix, r.ticket))
            frames.append((key, frame.data))
            metas.append(
                cache_pb2.RolloutMeta(
                    sample_id=r.sample_id,
                    ticket=r.ticket,
                    oldest_version=int(r.versions.min()),
                    newest_version=int(r.versions.max()),
                    num_tokens=r.num_tokens,
                    support_size=0 if r.support_ids is None else int(r.support_ids.shape[1]),
                    payload=cache_pb2.PayloadRef(key=key, nbytes=frame.nbytes, checksum=frame.checksum),
                )
            )
        store.write(frames)
        return metas

    # -- teachers ---------------------------------------------------------------------------

    def claim_rollouts(self, teacher: str, max_rollouts: int, wait_ms: int = 0) -> list[Rollout]:
        """Claim unscored rollouts; unscored claims are re-delivered after the teacher lease."""
        req = cache_pb2.ClaimRolloutsRequest(
            teacher=teacher, max_rollouts=max_rollouts, wait_ms=wait_ms, by_reference=self.payloads is not None
        )
        resp = self._call(self._stub.ClaimRollouts, req, wait_ms)
        if resp is None:  # cut by stop_waiting
            return []
        if self.payloads is None:
            return [rollout_from_proto(r, self._limits, f"rollouts[{i}]") for i, r in enumerate(resp.rollouts)]
        metas = list(resp.metas)
        frames = self.payloads.read([m.payload.key for m in metas], [m.payload.nbytes for m in metas])
        out, refused = [], {}
        for i, (m, frame) in enumerate(zip(metas, frames, strict=True)):
            try:
                if frame is None:
                    raise payload.PayloadError(f"rollouts[{i}]: frame {m.payload.key} is gone", "payload_missing")
                r = payload.decode_rollout(
                    frame, self._limits, sample_id=m.sample_id, checksum=m.payload.checksum, field=f"rollouts[{i}]"
                )
                if r.oldest_version != m.oldest_version or r.num_tokens != m.num_tokens:
                    raise payload.PayloadError(f"rollouts[{i}]: the frame does not match its metadata")
            except payload.PayloadError as exc:
                refused[m.sample_id] = exc.reason
                continue
            if len(self._shapes) > 65536:  # claims never scored (the teacher gave up on them)
                self._shapes.clear()
                self._scores_prefix.clear()
            self._shapes[m.sample_id] = (m.num_tokens, m.support_size)
            self._scores_prefix[m.sample_id] = payload.scores_prefix(self.payloads.prefix, m.payload.key)
            out.append(r)
        if refused:
            self._call(self._stub.PutScores, cache_pb2.PutScoresRequest(refused=refused))
        return out

    def put_scores(self, scores: Sequence[TeacherScores]) -> PutResult:
        """Store teacher scores of claimed rollouts. Raises CacheFull under backpressure."""
        if self.payloads is None:
            req = cache_pb2.PutScoresRequest(scores=[scores_to_proto(s, self._dtype) for s in scores])
        else:
            req = cache_pb2.PutScoresRequest(metas=self._write_scores(scores, self.payloads))
        resp = self._call(self._stub.PutScores, req)
        return PutResult(int(resp.accepted), int(resp.duplicates))

    def _write_scores(self, scores: Sequence[TeacherScores], store: PayloadStore) -> list[Any]:
        metas, frames = [], []
        for i, sc in enumerate(scores):
            t = int(sc.token_logprobs.shape[0])
            k = 0 if sc.support_logprobs is None else int(sc.support_logprobs.shape[1])
            t, k = self._shapes.pop(sc.sample_id, (t, k))
            payload.check_scores(sc, self._limits, t, k or None, f"scores[{i}]")
            frame = payload.encode_scores(sc, self._payload_dtype)
            key = store.new_key("s", sc.sample_id, self._scores_prefix.pop(sc.sample_id, None))
            frames.append((key, frame.data))
            metas.append(
                cache_pb2.ScoresMeta(
                    sample_id=sc.sample_id,
                    num_tokens=t,
                    support_size=k,
                    payload=cache_pb2.PayloadRef(key=key, nbytes=frame.nbytes, checksum=frame.checksum),
                )
            )
        store.write(frames)
        return metas

    # -- learner ----------------------------------------------------------------------------

    def begin_learner(
        self, learner: str = "learner", checkpoint_version: int | None = None, cursor: CursorState | None = None
    ) -> LearnerStart:
        """Start as the run's learner: take a fencing epoch (kept here and sent with every later
        pull, ack and publish; older learners are refused from now on), learn the version to start
        at, and hand the cache the checkpoint's prompt cursor (restored when Redis lost its own)."""
        req = cache_pb2.BeginLearnerRequest(
            learner=learner, has_checkpoint=checkpoint_version is not None, checkpoint_version=checkpoint_version or 0
        )
        if cursor is not None:
            req.cursor.CopyFrom(cursor_to_proto(cursor))
        resp = self._call(self._stub.BeginLearner, req)
        self.learner_epoch = int(resp.learner_epoch)
        return LearnerStart(
            int(resp.learner_epoch), int(resp.published_version), int(resp.start_version), int(resp.cursor_restored)
        )

    def prompt_cursor(
        self, trained_batch_ids: Sequence[str], saved: CursorState | None = None, trained_tickets: Sequence[str] = ()
    ) -> CursorState:
        """The prompt cursor state to record in a checkpoint that saves `trained_batch_ids`
        (`saved`, the previous checkpoint's, is restored first if Redis lost its state since;
        `trained_tickets`, the tickets of those batches' samples, are never re-opened by it)."""
        req = cache_pb2.PromptCursorRequest(
            learner_epoch=self.learner_epoch,
            trained_batch_ids=list(trained_batch_ids),
            trained_tickets=list(trained_tickets),
        )
        if saved is not None:
            req.saved.CopyFrom(cursor_to_proto(saved))
        resp = self._call(self._stub.PromptCursor, req)
        return cursor_from_proto(resp.cursor)

    def pull_batch(
        self,
        size: int,
        learner_version: int,
        wait_ms: int = 0,
        learner: str = "learner",
        keep: Sequence[str] = (),
    ) -> Batch | None:
        """Claim exactly `size` scored samples no staler than the bound, or None if not ready;
        `keep`: batches trained but not acked yet (their claims are extended)."""
        req = cache_pb2.PullBatchRequest(
            size=size,
            learner_version=learner_version,
            wait_ms=wait_ms,
            learner=learner,
            by_reference=self.payloads is not None,
            learner_epoch=self.learner_epoch,
            keep_batch_ids=list(keep),
        )
        resp = self._call(self._stub.PullBatch, req, wait_ms)
        if resp is None:  # cut by stop_waiting
            return None
        self._runs, self._admission_held = tuple(resp.runs), bool(resp.admission_held)
        if not resp.batch_id:
            return None
        if self.payloads is None:
            samples = [scored_from_proto(s, self._limits, f"samples[{i}]") for i, s in enumerate(resp.samples)]
            return Batch(batch_id=resp.batch_id, samples=samples, staleness=[int(s) for s in resp.staleness])
        batch = self._read_batch(resp.batch_id, list(resp.refs), self.payloads)
        if batch.refused and not batch.samples:
            self.ack_batch(batch.batch_id)  # nothing to train: every sample counted dropped
            return None
        return batch

    def run_state(self) -> tuple[tuple[str, ...], bool]:
        """What the last PullBatch said: each cache shard's run id, and whether fresh admission is
        held until the learner restores the prompt cursor (a run state re-created mid-run)."""
        return self._runs, self._admission_held

    def _read_batch(self, batch_id: str, refs: list[Any], store: PayloadStore) -> Batch:
        keys, sizes = [], []
        for ref in refs:
            keys += [ref.rollout.payload.key, ref.scores.payload.key]
            sizes += [ref.rollout.payload.nbytes, ref.scores.payload.nbytes]
        frames = store.read(keys, sizes)
        samples, staleness, refused = [], [], {}
        for i, ref in enumerate(refs):
            r_meta, s_meta, field = ref.rollout, ref.scores, f"samples[{i}]"
            try:
                r_frame, s_frame = frames[2 * i], frames[2 * i + 1]
                if r_frame is None or s_frame is None:
                    raise payload.PayloadError(f"{field}: a frame of {r_meta.sample_id!r} is gone", "payload_missing")
                r = payload.decode_rollout(
                    r_frame, self._limits, sample_id=r_meta.sample_id, checksum=r_meta.payload.checksum,
                    field=f"{field}.rollout",
                )  # fmt: skip
                if r.oldest_version != r_meta.oldest_version or r.num_tokens != r_meta.num_tokens:
                    raise payload.PayloadError(f"{field}.rollout: the frame does not match its metadata")
                sc = payload.decode_scores(
                    s_frame, self._limits, sample_id=r_meta.sample_id, num_tokens=r.num_tokens,
                    support_size=None if r.support_ids is None else int(r.support_ids.shape[1]),
                    checksum=s_meta.payload.checksum, field=f"{field}.scores",
                )  # fmt: skip
            except payload.PayloadError as exc:
                refused[r_meta.sample_id] = exc.reason
                continue
            samples.append(ScoredSample(rollout=r, scores=sc))
            staleness.append(int(ref.staleness))
        if refused:
            self._refused[batch_id] = refused
        return Batch(batch_id=batch_id, samples=samples, staleness=staleness, refused=refused)

    def ack_batch(self, batch_id: str) -> int:
        """The batch was trained: its samples are removed and counted (frames this client refused
        when it read the batch are counted dropped with their reason); returns how many trained."""
        req = cache_pb2.AckBatchRequest(
            batch_id=batch_id, refused=self._refused.get(batch_id, {}), learner_epoch=self.learner_epoch
        )
        trained = int(self._call(self._stub.AckBatch, req).trained)
        self._refused.pop(batch_id, None)
        return trained

    def publish_version(self, version: int, finished: bool = False) -> int:
        """Publish the learner's version (optimizer steps taken); `finished` stops admission."""
        req = cache_pb2.PublishVersionRequest(version=version, finished=finished, learner_epoch=self.learner_epoch)
        return int(self._call(self._stub.PublishVersion, req).version)

    def published_version(self) -> int:
        """The learner version the cache has published (0 before the first publish)."""
        return self.stats_snapshot().learner_version

    # -- anyone -----------------------------------------------------------------------------

    def stats_snapshot(self) -> CacheStats:
        """The accounting as a typed record."""
        r = self._call(self._stub.Stats, cache_pb2.StatsRequest())
        return CacheStats(
            learner_version=int(r.learner_version),
            admitted=int(r.admitted),
            produced=int(r.produced),
            trained=int(r.trained),
            dropped=dict(r.dropped),
            in_flight=int(r.in_flight),
            bytes_held=int(r.bytes_held),
            byte_budget=int(r.byte_budget),
            queue_depth=dict(r.queue_depth),
            staleness_served={int(k): int(v) for k, v in r.staleness_served.items()},
            evictions=dict(r.evictions),
            max_staleness=int(r.max_staleness),
            redis_errors=int(r.redis_errors),
            counters=dict(r.counters),
            finished=bool(r.finished),
            staleness_window=int(r.staleness_window),
        )

    def stats(self) -> dict[str, Any]:
        """The accounting as a plain dict (JSON-friendly), e.g. for run reports."""
        s = self.stats_snapshot()
        return {
            "learner_version": s.learner_version,
            "admitted": s.admitted,
            "produced": s.produced,
            "trained": s.trained,
            "dropped": dict(s.dropped),
            "in_flight": s.in_flight,
            "bytes_held": s.bytes_held,
            "byte_budget": s.byte_budget,
            "queue_depth": dict(s.queue_depth),
            "staleness_served": dict(s.staleness_served),
            "evictions": dict(s.evictions),
            "max_staleness": s.max_staleness,
            "redis_errors": s.redis_errors,
            "counters": dict(s.counters),
            "finished": s.finished,
            "staleness_window": s.staleness_window,
        }
