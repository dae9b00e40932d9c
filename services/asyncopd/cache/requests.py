"""Parsing cache requests: a protobuf request in, validated values and store records out.

Every put is validated in full (shapes, ids < vocab, finite log-probs, versions not from the
future, sizes) before the store sees any of it, so a bad request stores nothing. Validated
records are re-encoded with the configured log-prob dtype and kept as serialized protobuf
bytes (raw tensors inside, no second codec); batches are rebuilt from those bytes.

Refusals are `WireError`/`ValueError`s naming the field (the servicer's `status_errors` maps
them to INVALID_ARGUMENT). The staleness rules come from `asyncopd.cache.policy`. It knows the
wire messages and the request limits; it knows nothing of Redis and calls no store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncopd.cache.policy import StalenessPolicy, check_unique
from asyncopd.cache.store import StoredRollout
from asyncopd.wire.convert import Limits, LogprobDType, rollout_from_proto, scores_from_proto
from asyncopd.wire.errors import WireError
from asyncopd.wire.tensors import DTYPE_NAMES, encode

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

    def rollouts(self, request: Any, published: int) -> list[StoredRollout]:
        """The request's rollouts as the store keeps them; `published` is the cache's learner version."""
        self._size(request)
        self.count("rollouts", len(request.rollouts), "rollouts")
        check_unique((msg.sample_id for msg in request.rollouts), "rollouts")
        limits = self._wire_limits()
        stored = []
        for i, msg in enumerate(request.rollouts):
            field = f"rollouts[{i}]"
            r = rollout_from_proto(msg, limits, field)
            self.policy.check_token_version(int(r.versions.max()), published, f"{field}.versions")
            name(r.ticket, f"{field}.ticket")
            blob = compact_bytes(msg, r, self.limits.logprob_dtype)
            k = 0 if r.support_ids is None else int(r.support_ids.shape[1])
            stored.append(StoredRollout(r.sample_id, r.ticket, r.oldest_version, r.num_tokens, k, blob))
        return stored

    def score_ids(self, request: Any) -> list[str]:
        """The sample ids a PutScores request scores (checked before their shapes are looked up)."""
        self._size(request)
        self.count("scores", len(request.scores), "scores")
        sids = [name(s.sample_id, f"scores[{i}].sample_id") for i, s in enumerate(request.scores)]
        check_unique(sids, "scores")
        return sids

    def scores(
        self, request: Any, shapes: Callable[[Sequence[str]], dict[str, tuple[int, int]]]
    ) -> list[tuple[str, bytes]]:
        """(sample_id, stored bytes) per score; `shapes(ids)` gives (num_tokens, support_size) of
        each sample still waiting for scores. Scores for any other sample are late work: passed
        on with empty bytes, for the store to count."""
        shape_of = shapes(self.score_ids(request))
        limits = self._wire_limits()
        items = []
        for i, msg in enumerate(request.scores):
            shape = shape_of.get(msg.sample_id)
            if shape is None:  # unknown, already scored, or gone: late work, ignored and counted
                items.append((msg.sample_id, b""))
                continue
            t, k = shape
            if k == 0 and msg.HasField("support_logprobs"):
                raise WireError(f"scores[{i}].support_logprobs: given, but the rollout carries no support")
            s = scores_from_proto(msg, limits, t, k or None, f"scores[{i}]")
            items.append((s.sample_id, compact_bytes(msg, s, self.limits.logprob_dtype)))
        return items

    def pull(self, request: Any) -> tuple[int, int, str, int]:
        """(size, learner_version, learner, wait_ms) of a PullBatch request."""
        self.policy.check_pull_size(request.size)
        if request.learner_version < 0:
            raise WireError(f"learner_version: {request.learner_version} is negative")
        learner = name(request.learner or "learner", "learner")
        return request.size, request.learner_version, learner, self.wait_ms("wait_ms", request.wait_ms)
