"""Domain records <-> protobuf messages, validating everything that comes off the wire.

Decoding checks every field against `Limits` (vocabulary, lengths, support size, the
learner's version) and raises `WireError` with the field path and the reason, before any
caller stores anything. Encoding chooses the wire dtype of log-probs (fp32, fp16 or bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from asyncopd.records import CursorState, Prompt, Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores
from asyncopd.v1 import cache_pb2
from asyncopd.v1 import common_pb2 as pb
from asyncopd.wire.errors import WireError
from asyncopd.wire.tensors import decode_numpy, encode, to_float32

LogprobDType = Literal["float32", "float16", "bfloat16"]
_INT_KINDS = "iu"
_MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Limits:
    """What a service accepts. `None` leaves a check off (e.g. a vocab the service doesn't know)."""

    vocab_size: int | None = None
    max_prompt_tokens: int = 32768
    max_response_tokens: int = 32768
    max_support: int = 4096
    max_version: int | None = None  # versions above this come "from the future"


def _ident(value: str, field: str) -> str:
    if not value:
        raise WireError(f"{field}: must not be empty")
    if len(value) > _MAX_ID_CHARS:
        raise WireError(f"{field}: {len(value)} characters, at most {_MAX_ID_CHARS}")
    return value


def _present(parent: object, name: str) -> bool:
    return bool(parent.HasField(name))  # type: ignore[attr-defined]


def check_ids(arr: np.ndarray, field: str, shape: tuple[int | None, ...], limits: Limits) -> np.ndarray:
    """Token ids already decoded: an integer dtype, `shape`, within [0, vocab); returned as int32."""
    if arr.dtype.kind not in _INT_KINDS:
        raise WireError(f"{field}: token ids must be an integer dtype, got {arr.dtype}")
    _shape(arr, field, shape)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise WireError(f"{field}: negative token id {lo}")
        if limits.vocab_size is not None and hi >= limits.vocab_size:
            raise WireError(f"{field}: token id {hi} is outside the vocabulary (size {limits.vocab_size})")
    return arr.astype(np.int32, copy=False)


def check_logprobs(arr: np.ndarray, field: str, shape: tuple[int | None, ...], allow_neg_inf: bool) -> np.ndarray:
    """Log-probs already decoded: a float dtype, `shape`, no NaN/+inf, <= 0; returned as float32."""
    if arr.dtype.kind != "f":
        raise WireError(f"{field}: log-probs must be a float dtype, got {arr.dtype}")
    _shape(arr, field, shape)
    arr = to_float32(arr)
    if arr.size:
        # One pass finds all three faults: max is NaN when any element is, +inf when any is.
        hi = float(arr.max())
        if np.isnan(hi):
            raise WireError(f"{field}: NaN log-prob at flat index {int(np.flatnonzero(np.isnan(arr))[0])}")
        if hi == np.inf or (not allow_neg_inf and float(arr.min()) == -np.inf):
            raise WireError(f"{field}: infinite log-prob (log-probs must be finite here)")
        if hi > 1e-3:
            raise WireError(f"{field}: log-prob {hi:.4g} > 0 is not a log-probability")
    return arr


class TensorSource(Protocol):
    """Where a record's tensors come from: a protobuf message or a payload frame."""

    def has(self, name: str) -> bool: ...
    def get(self, name: str, field: str) -> np.ndarray: ...


@dataclass(frozen=True)
class _ProtoTensors:
    msg: Any

    def has(self, name: str) -> bool:
        return bool(self.msg.HasField(name))

    def get(self, name: str, field: str) -> np.ndarray:
        return decode_numpy(getattr(self.msg, name), field)


def _shape(arr: np.ndarray, field: str, shape: tuple[int | None, ...]) -> None:
    ok = arr.ndim == len(shape) and all(w is None or w == d for w, d in zip(shape, arr.shape, strict=False))
    if not ok:
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise WireError(f"{field}: shape {list(arr.shape)} does not match the expected {want}")


MAX_CURSOR_RUNS = 1024  # cache shards a cursor state may name


def cursor_to_proto(state: CursorState) -> cache_pb2.CursorState:
    return cache_pb2.CursorState(cursor=state.cursor, open=list(state.open), runs=list(state.runs))


def cursor_from_proto(msg: cache_pb2.CursorState, field: str = "cursor") -> CursorState:
    if msg.cursor < 0 or any(p < 0 or p >= msg.cursor for p in msg.open):
        raise WireError(f"{field}: open positions must lie in [0, cursor)")
    if len(msg.runs) > MAX_CURSOR_RUNS:
        raise WireError(f"{field}.runs: {len(msg.runs)} run ids, at most {MAX_CURSOR_RUNS}")
    if any(len(r) > 256 for r in msg.runs):
        raise WireError(f"{field}.runs: a run id longer than 256 characters")
    return CursorState(int(msg.cursor), tuple(int(p) for p in msg.open), tuple(str(r) for r in msg.runs))


def task_to_proto(task: TaskInfo) -> pb.TaskInfo:
    return pb.TaskInfo(task=task.task, answer=task.answer, prompt_text=task.prompt_text)


def task_from_proto(msg: pb.TaskInfo) -> TaskInfo:
    return TaskInfo(task=msg.task, answer=msg.answer, prompt_text=msg.prompt_text)


def prompt_to_proto(p: Prompt) -> pb.Prompt:
    return pb.Prompt(
        prompt_id=p.prompt_id,
        prompt_ids=encode(np.asarray(p.prompt_ids, dtype=np.int32)),
        task=task_to_proto(p.task),
        epoch=p.epoch,
        ticket=p.ticket,
        admitted_version=p.admitted_version,
    )


def prompt_from_proto(msg: pb.Prompt, limits: Limits, field: str = "prompt") -> Prompt:
    prompt_ids = check_ids(decode_numpy(msg.prompt_ids, f"{field}.prompt_ids"), f"{field}.prompt_ids", (None,), limits)
    _check_length(prompt_ids, f"{field}.prompt_ids", limits.max_prompt_tokens)
    return Prompt(
        prompt_id=_ident(msg.prompt_id, f"{field}.prompt_id"),
        prompt_ids=prompt_ids,
        task=task_from_proto(msg.task),
        epoch=msg.epoch,
        ticket=msg.ticket,
        admitted_version=msg.admitted_version,
    )


def _check_length(arr: np.ndarray, field: str, limit: int) -> None:
    if arr.shape[0] == 0:
        raise WireError(f"{field}: must hold at least one token")
    if arr.shape[0] > limit:
        raise WireError(f"{field}: {arr.shape[0]} tokens exceed the limit of {limit}")


def rollout_to_proto(r: Rollout, logprob_dtype: LogprobDType = "float32") -> pb.Rollout:
    msg = pb.Rollout(
        sample_id=r.sample_id,
        prompt_id=r.prompt_id,
        ticket=r.ticket,
        task=task_to_proto(r.task),
        prompt_ids=encode(np.asarray(r.prompt_ids, dtype=np.int32)),
        response_ids=encode(np.asarray(r.response_ids, dtype=np.int32)),
        behavior_logprobs=encode(np.asarray(r.behavior_logprobs, dtype=np.float32), logprob_dtype),
        versions=encode(np.asarray(r.versions, dtype=np.int32)),
        support_kind=int(r.support_kind),  # type: ignore[arg-type]
        replica=r.replica,
        truncated=r.truncated,
        created_unix=r.created_unix,
    )
    if r.support_ids is not None:
        msg.support_ids.CopyFrom(encode(np.asarray(r.support_ids, dtype=np.int32)))
    if r.support_logprobs is not None:
        msg.support_logprobs.CopyFrom(encode(np.asarray(r.support_logprobs, dtype=np.float32), logprob_dtype))
    return msg


def rollout_from_proto(msg: pb.Rollout, limits: Limits, field: str = "rollout") -> Rollout:
    """Decode and validate a rollout; raises WireError naming the first bad field."""
    sample_id = _ident(msg.sample_id, f"{field}.sample_id")
    prompt_id = _ident(msg.prompt_id, f"{field}.prompt_id")
    return rollout_from_tensors(
        Rollout(
            sample_id=sample_id,
            prompt_id=prompt_id,
            ticket=msg.ticket,
            task=task_from_proto(msg.task),
            prompt_ids=_NO_ARRAY,
            response_ids=_NO_ARRAY,
            behavior_logprobs=_NO_ARRAY,
            versions=_NO_ARRAY,
            support_kind=msg.support_kind,  # type: ignore[arg-type]  # checked below
            replica=msg.replica,
            truncated=msg.truncated,
            created_unix=msg.created_unix,
        ),
        _ProtoTensors(msg),
        limits,
        field,
    )


_NO_ARRAY = np.zeros(0, np.int32)


def rollout_from_tensors(head: Rollout, src: TensorSource, limits: Limits, field: str = "rollout") -> Rollout:
    """Validate a rollout whose scalar fields are in `head` and whose tensors come from `src`
    (its array fields are ignored; `support_kind` may still be an unchecked integer)."""

    def ids(name: str, shape: tuple[int | None, ...]) -> np.ndarray:
        return check_ids(src.get(name, f"{field}.{name}"), f"{field}.{name}", shape, limits)

    prompt_ids = ids("prompt_ids", (None,))
    _check_length(prompt_ids, f"{field}.prompt_ids", limits.max_prompt_tokens)
    response_ids = ids("response_ids", (None,))
    _check_length(response_ids, f"{field}.response_ids", limits.max_response_tokens)
    t = int(response_ids.shape[0])
    behavior = check_logprobs(
        src.get("behavior_logprobs", f"{field}.behavior_logprobs"),
        f"{field}.behavior_logprobs",
        (t,),
        allow_neg_inf=False,
    )
    versions_raw = src.get("versions", f"{field}.versions")
    if versions_raw.dtype.kind not in _INT_KINDS:
        raise WireError(f"{field}.versions: must be an integer dtype, got {versions_raw.dtype}")
    _shape(versions_raw, f"{field}.versions", (t,))
    versions = versions_raw.astype(np.int32, copy=False)
    if int(versions.min()) < 0:
        raise WireError(f"{field}.versions: negative version {int(versions.min())}")
    if limits.max_version is not None and int(versions.max()) > limits.max_version:
        raise WireError(
            f"{field}.versions: version {int(versions.max())} is from the future "
            f"(the learner is at {limits.max_version})"
        )
    if head.support_kind not in SupportKind._value2member_map_:
        raise WireError(f"{field}.support_kind: unknown value {head.support_kind}")
    kind = SupportKind(head.support_kind)
    support_ids = support_logprobs = None
    has_ids, has_lps = src.has("support_ids"), src.has("support_logprobs")
    if kind == SupportKind.NONE:
        if has_ids or has_lps:
            raise WireError(f"{field}.support_ids: given but support_kind is SUPPORT_NONE")
    else:
        if not (has_ids and has_lps):
            raise WireError(f"{field}: support_kind {kind.name} needs support_ids and support_logprobs")
        support_ids = ids("support_ids", (t, None))
        k = int(support_ids.shape[1])
        if not 1 <= k <= limits.max_support:
            raise WireError(f"{field}.support_ids: support size {k} outside 1..{limits.max_support}")
        if limits.vocab_size is not None and k > limits.vocab_size:
            raise WireError(f"{field}.support_ids: support size {k} exceeds the vocabulary ({limits.vocab_size})")
        support_logprobs = check_logprobs(
            src.get("support_logprobs", f"{field}.support_logprobs"),
            f"{field}.support_logprobs",
            (t, k),
            allow_neg_inf=True,
        )
        if kind == SupportKind.MC_SAMPLES and not np.array_equal(support_ids[:, 0], response_ids):
            raise WireError(f"{field}.support_ids: MC column 0 must be the generated tokens")
    return Rollout(
        sample_id=head.sample_id,
        prompt_id=head.prompt_id,
        ticket=head.ticket,
        task=head.task,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        behavior_logprobs=behavior,
        versions=versions,
        support_kind=kind,
        support_ids=support_ids,
        support_logprobs=support_logprobs,
        replica=head.replica,
        truncated=head.truncated,
        created_unix=head.created_unix,
    )


def scores_to_proto(s: TeacherScores, logprob_dtype: LogprobDType = "float32") -> pb.TeacherScores:
    msg = pb.TeacherScores(
        sample_id=s.sample_id,
        token_logprobs=encode(np.asarray(s.token_logprobs, dtype=np.float32), logprob_dtype),
        teacher=s.teacher,
    )
    if s.topk_ids is not None:
        msg.topk_ids.CopyFrom(encode(np.asarray(s.topk_ids, dtype=np.int32)))
    for name in ("topk_logprobs", "support_logprobs", "tail_logmass"):
        value = getattr(s, name)
        if value is not None:
            getattr(msg, name).CopyFrom(encode(np.asarray(value, dtype=np.float32), logprob_dtype))
    return msg


def scores_from_proto(
    msg: pb.TeacherScores,
    limits: Limits,
    num_tokens: int | None = None,
    support_size: int | None = None,
    field: str = "scores",
) -> TeacherScores:
    """Decode and validate teacher scores; with `num_tokens`/`support_size` (from the rollout
    they score) the shapes are checked against it."""
    sample_id = _ident(msg.sample_id, f"{field}.sample_id")
    if not _present(msg, "token_logprobs"):
        raise WireError(f"{field}.token_logprobs: required")
    return scores_from_tensors(
        sample_id,
        msg.teacher,
        _ProtoTensors(msg),
        limits,
        num_tokens=num_tokens,
        support_size=support_size,
        field=field,
    )


def scores_from_tensors(
    sample_id: str,
    teacher: str,
    src: TensorSource,
    limits: Limits,
    *,
    num_tokens: int | None = None,
    support_size: int | None = None,
    field: str = "scores",
) -> TeacherScores:
    """Validate teacher scores whose tensors come from `src` (see `scores_from_proto`)."""

    def lps(name: str, shape: tuple[int | None, ...]) -> np.ndarray:
        return check_logprobs(src.get(name, f"{field}.{name}"), f"{field}.{name}", shape, allow_neg_inf=True)

    if not src.has("token_logprobs"):
        raise WireError(f"{field}.token_logprobs: required")
    token = lps("token_logprobs", (num_tokens,))
    t = int(token.shape[0])
    topk_ids = topk_lps = support_lps = tail = None
    if src.has("topk_ids") != src.has("topk_logprobs"):
        raise WireError(f"{field}: topk_ids and topk_logprobs come together")
    if src.has("topk_ids"):
        topk_ids = check_ids(src.get("topk_ids", f"{field}.topk_ids"), f"{field}.topk_ids", (t, None), limits)
        kt = int(topk_ids.shape[1])
        if not 1 <= kt <= limits.max_support:
            raise WireError(f"{field}.topk_ids: top-k size {kt} outside 1..{limits.max_support}")
        topk_lps = lps("topk_logprobs", (t, kt))
    if src.has("support_logprobs"):
        support_lps = lps("support_logprobs", (t, support_size))
    elif support_size is not None:
        raise WireError(f"{field}.support_logprobs: required, the rollout carries support of size {support_size}")
    if src.has("tail_logmass"):
        tail = lps("tail_logmass", (t,))
    return TeacherScores(
        sample_id=sample_id,
        token_logprobs=token,
        topk_ids=topk_ids,
        topk_logprobs=topk_lps,
        support_logprobs=support_lps,
        tail_logmass=tail,
        teacher=teacher,
    )


def scored_to_proto(s: ScoredSample, logprob_dtype: LogprobDType = "float32") -> pb.ScoredSample:
    return pb.ScoredSample(
        rollout=rollout_to_proto(s.rollout, logprob_dtype), scores=scores_to_proto(s.scores, logprob_dtype)
    )


def scored_from_proto(msg: pb.ScoredSample, limits: Limits, field: str = "sample") -> ScoredSample:
    rollout = rollout_from_proto(msg.rollout, limits, f"{field}.rollout")
    k = None if rollout.support_ids is None else int(rollout.support_ids.shape[1])
    scores = scores_from_proto(msg.scores, limits, rollout.num_tokens, k, f"{field}.scores")
    if scores.sample_id != rollout.sample_id:
        raise WireError(f"{field}.scores.sample_id: {scores.sample_id!r} does not match the rollout's")
    return ScoredSample(rollout=rollout, scores=scores)
