"""Parsing cache requests: a protobuf request in, validated values and store records out.

A put comes one of two ways. By reference (`metas`, the normal path): the producer wrote its
payload frame to Redis itself and sends metadata only (ids, lengths, versions, byte count,
checksum, key); this module checks the metadata (the key must be this sample's, versions not
from the future) and the store checks, in its put script, that the frame is there with that
length and that scores have their rollout's shape. Inline (`rollouts`/`scores`, clients
without Redis access): validated in full (shapes, ids < vocab, finite log-probs, versions not
from the future, sizes) and encoded as a payload frame (`asyncopd.wire.payload`, the configured
log-prob dtype) that the store writes. Either way a bad request stores nothing, and the store
sees the same records.

Refusals are `WireError`/`ValueError`s naming the field (the servicer's `status_errors` maps
them to INVALID_ARGUMENT). The staleness rules come from `asyncopd.cache.policy`. It knows the
wire messages and the request limits; it knows nothing of Redis and calls no store.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncopd.cache.policy import StalenessPolicy, check_unique
from asyncopd.cache.store import PayloadRef, StoredRollout, StoredScores
from asyncopd.wire import payload
from asyncopd.wire.convert import Limits, LogprobDType, rollout_from_proto, scores_from_proto
from asyncopd.wire.errors import WireError

# Why a reader may refuse a frame (becomes the drop reason; anything else is refused).
REFUSAL_REASONS = frozenset({"corrupt", "invalid", "payload_missing"})


@dataclass(frozen=True)
class ServicerLimits:
    """Request limits and the storage dtype (from `CacheConfig`)."""

    vocab_size: int | None
    logprob_dtype: LogprobDType = "float16"
    max_request_bytes: int = 48 << 20
    max_items: int = 4096
    max_wait_ms: int = 30000
    max_waiting: int = 6  # requests that may wait at once (`waits.waiting_limit` of the gRPC workers)
    max_prompt_tokens: int = 32768
    max_response_tokens: int = 32768
    key_prefix: str = "asyncopd"  # the run's redis.key_prefix: payload keys must be under it
    tagged: bool = False  # shard keyspaces are hash-tagged (cache.shards > 1 or redis.cluster)
    max_support: int = 4096


def name(value: str, field: str) -> str:
    """A replica/teacher/learner/ticket/batch name: non-empty, at most 256 characters."""
    if not value:
        raise WireError(f"{field}: must not be empty")
    if len(value) > 256:
        raise WireError(f"{field}: {len(value)} characters, at most 256")
    return value


@dataclass(frozen=True)
class RequestParser:
    """Validates each request against `limits` and the staleness `policy`."""

    limits: ServicerLimits
    policy: StalenessPolicy

    def count(self, field: str, n: int, what: str) -> int:
        if n < 1:
            raise WireError(f"{field}: must be >= 1, got {n}")
        if n > self.limits.max_items:
            raise WireError(f"{field}: {n} {what} exceed the limit of {self.limits.max_items} per request")
        return n

    def wait_ms(self, field: str, wait_ms: int) -> int:
        """A long-poll wait, capped at the configured maximum."""
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

    def _wire_limits(self) -> Limits:
        return Limits(
            vocab_size=self.limits.vocab_size,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_response_tokens=self.limits.max_response_tokens,
        )

    def tickets(self, request: Any) -> list[str]:
        if len(request.tickets) > self.limits.max_items:
            raise WireError(f"tickets: {len(request.tickets)} exceed the limit of {self.limits.max_items}")
        return [name(t, f"tickets[{i}]") for i, t in enumerate(request.tickets)]

    def _prefix(self, kind: payload.PayloadKind, ticket: str = "", key: str = "") -> str:
        """The key prefix a frame must be under: the run's, or in a hash-tagged keyspace its
        shard's (a rollout's from its ticket, scores' from the shard named in their key)."""
        if not self.limits.tagged:
            return self.limits.key_prefix
        if kind == "r":
            return payload.frame_prefix(self.limits.key_prefix, ticket)
        return (
            payload.scores_prefix(self.limits.key_prefix, key)
            if key
            else payload.shard_prefix(self.limits.key_prefix, 0)
        )

    def _ref(self, msg: Any, kind: payload.PayloadKind, sample_id: str, field: str, ticket: str = "") -> PayloadRef:
        if not msg.HasField("payload"):
            raise WireError(f"{field}.payload: required")
        ref = msg.payload
        prefix = self._prefix(kind, ticket, ref.key)
        key = payload.check_key(ref.key, prefix, kind, sample_id, f"{field}.payload.key")
        if ref.nbytes < 1 or ref.nbytes > self.limits.max_request_bytes * 64:
            raise WireError(f"{field}.payload.nbytes: {ref.nbytes} is not a plausible frame length")
        return PayloadRef(key, int(ref.nbytes), int(ref.checksum))

    def _new_ref(self, kind: payload.PayloadKind, sample_id: str, frame: payload.Frame, ticket: str = "") -> PayloadRef:
        key = payload.payload_key(self._prefix(kind, ticket), kind, sample_id, uuid.uuid4().hex[:16])
        return PayloadRef(key, frame.nbytes, frame.checksum)

    def rollouts(self, request: Any, published: int) -> list[StoredRollout]:
        """The request's rollouts as the store keeps them; `published` is the cache's learner version."""
        self._size(request)
        if len(request.rollouts) and len(request.metas):
            raise WireError("rollouts and metas: send one or the other in a request")
        if len(request.metas):
            return self._rollout_metas(request, published)
        self.count("rollouts", len(request.rollouts), "rollouts")
        check_unique((msg.sample_id for msg in request.rollouts), "rollouts")
        limits = self._wire_limits()
        stored = []
        for i, msg in enumerate(request.rollouts):
            field = f"rollouts[{i}]"
            r = rollout_from_proto(msg, limits, field)
            newest = int(r.versions.max())
            self.policy.check_token_version(newest, published, f"{field}.versions")
            name(r.ticket, f"{field}.ticket")
            frame = payload.encode_rollout(r, self.limits.logprob_dtype)
            k = 0 if r.support_ids is None else int(r.support_ids.shape[1])
            ref = self._new_ref("r", r.sample_id, frame, r.ticket)
            stored.append(
                StoredRollout(r.sample_id, r.ticket, r.oldest_version, r.num_tokens, k, ref, newest, frame.data)
            )
        return stored

    def _rollout_metas(self, request: Any, published: int) -> list[StoredRollout]:
        self.count("metas", len(request.metas), "rollouts")
        check_unique((m.sample_id for m in request.metas), "metas")
        stored = []
        for i, m in enumerate(request.metas):
            field = f"metas[{i}]"
            sid = name(m.sample_id, f"{field}.sample_id")
            ticket = name(m.ticket, f"{field}.ticket")
            if not 1 <= m.num_tokens <= self.limits.max_response_tokens:
                raise WireError(f"{field}.num_tokens: {m.num_tokens} outside 1..{self.limits.max_response_tokens}")
            if not 0 <= m.support_size <= self.limits.max_support:
                raise WireError(f"{field}.support_size: {m.support_size} outside 0..{self.limits.max_support}")
            if not 0 <= m.oldest_version <= m.newest_version:
                raise WireError(
                    f"{field}.oldest_version: {m.oldest_version} must be >= 0 and <= newest_version {m.newest_version}"
                )
            self.policy.check_token_version(int(m.newest_version), published, f"{field}.newest_version")
            ref = self._ref(m, "r", sid, field, ticket)
            stored.append(
                StoredRollout(
                    sid, ticket, int(m.oldest_version), int(m.num_tokens), int(m.support_size), ref,
                    int(m.newest_version),
                )
            )  # fmt: skip
        return stored

    def score_ids(self, request: Any) -> list[str]:
        """The sample ids a PutScores request scores (checked before their shapes are looked up)."""
        self._size(request)
        if len(request.scores) and len(request.metas):
            raise WireError("scores and metas: send one or the other in a request")
        what, msgs = ("metas", request.metas) if len(request.metas) else ("scores", request.scores)
        if len(msgs) or not len(request.refused):
            self.count(what, len(msgs), "scores")
        sids = [name(s.sample_id, f"{what}[{i}].sample_id") for i, s in enumerate(msgs)]
        check_unique(sids, what)
        return sids

    def refused(self, refused: Any, field: str = "refused") -> dict[str, str]:
        """sample id -> reason of frames a reader refused (reasons from REFUSAL_REASONS)."""
        if len(refused) > self.limits.max_items:
            raise WireError(f"{field}: {len(refused)} entries exceed the limit of {self.limits.max_items}")
        out = {}
        for sid, reason in refused.items():
            name(sid, f"{field} key")
            if reason not in REFUSAL_REASONS:
                raise WireError(f"{field}[{sid!r}]: reason {reason!r}, expected one of {sorted(REFUSAL_REASONS)}")
            out[sid] = reason
        return out

    def scores(self, request: Any, shapes: Callable[[Sequence[str]], dict[str, tuple[int, int]]]) -> list[StoredScores]:
        """The request's scores as the store keeps them. Inline scores are parsed against the
        (num_tokens, support_size) of each sample still waiting for scores, `shapes(ids)`; scores
        for any other sample are late work, passed on without a frame for the store to count.
        Metadata declares its shape, which the store's put checks against the rollout's in the
        same atomic step (no lookup before it)."""
        sids = self.score_ids(request)
        if len(request.metas):
            return self._score_metas(request)
        shape_of = shapes(sids)
        limits = self._wire_limits()
        items = []
        for i, msg in enumerate(request.scores):
            shape = shape_of.get(msg.sample_id)
            if shape is None:  # unknown, already scored, or gone: late work, ignored and counted
                late = payload.payload_key(self._prefix("s"), "s", msg.sample_id, "late")
                items.append(StoredScores(msg.sample_id, PayloadRef(late, 0, 0)))
                continue
            t, k = shape
            if k == 0 and msg.HasField("support_logprobs"):
                raise WireError(f"scores[{i}].support_logprobs: given, but the rollout carries no support")
            s = scores_from_proto(msg, limits, t, k or None, f"scores[{i}]")
            frame = payload.encode_scores(s, self.limits.logprob_dtype)
            items.append(StoredScores(s.sample_id, self._new_ref("s", s.sample_id, frame), frame.data))
        return items

    def _score_metas(self, request: Any) -> list[StoredScores]:
        items = []
        for i, m in enumerate(request.metas):
            field = f"metas[{i}]"
            ref = self._ref(m, "s", m.sample_id, field)
            items.append(StoredScores(m.sample_id, ref, shape=(int(m.num_tokens), int(m.support_size))))
        return items

    def pull(self, request: Any) -> tuple[int, int, str, int]:
        """(size, learner_version, learner, wait_ms) of a PullBatch request."""
        if request.size != 0 or not request.keep_batch_ids:  # size 0 with kept batches: keep-alive only
            self.policy.check_pull_size(request.size)
        if request.learner_version < 0:
            raise WireError(f"learner_version: {request.learner_version} is negative")
        learner = name(request.learner or "learner", "learner")
        return request.size, request.learner_version, learner, self.wait_ms("wait_ms", request.wait_ms)
