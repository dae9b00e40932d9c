"""Payload frames: a rollout's or teacher scores' tensors as one self-describing, checksummed value.

Producers (rollout replicas, teachers) write frames to Redis themselves and tell the cache only
their metadata (`asyncopd.v1.RolloutMeta` / `ScoresMeta`: ids, lengths, byte count, checksum,
key); readers (teachers, the learner) read the frames back and verify them here. So payload
bytes never pass through the cache process.

A frame is

    prefix (24 bytes, little-endian): magic b"AOPF", format u8, kind u8, 0 u16,
                                      header length u32, CRC-32 u32, body length u64
    header (JSON, UTF-8): {"meta": {...scalar fields...}, "tensors": [[name, dtype, shape, offset], ...]}
    padding to a 64-byte boundary
    body: each tensor's raw little-endian bytes at a 64-byte aligned offset (relative to the body)

The CRC-32 covers everything after the prefix (header, padding, body). Ids are int32, log-probs
the producer's wire dtype (float16 by default; bfloat16 and float32 too). Decoding checks the
prefix, the checksum (and the one the metadata promised), the tensor table against the body, and
then every field as `asyncopd.wire.convert` checks a protobuf record (vocabulary, shapes, finite
log-probs, versions); tensors are zero-copy views of the frame until widened to float32.

Keys: `payload_key(prefix, "r"|"s", sample_id, nonce)`; the nonce keeps a re-scored or re-sent
sample's frame apart from the one the cache accepted. This module knows nothing of Redis.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from isal.isal_zlib import crc32  # zlib's CRC-32, with ISA-L's SIMD kernels (~10x faster)

from asyncopd.records import Rollout, SupportKind, TaskInfo, TeacherScores
from asyncopd.wire.convert import Limits, LogprobDType, rollout_from_tensors, scores_from_tensors
from asyncopd.wire.errors import WireError
from asyncopd.wire.tensors import bf16_to_float32, cast_into

MAGIC = b"AOPF"
FORMAT = 1
ALIGN = 64
KIND_ROLLOUT, KIND_SCORES = 1, 2
_PREFIX = struct.Struct("<4sBBHIIQ")
_MAX_HEADER = 1 << 16
_DTYPES: dict[str, np.dtype[Any]] = {
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),  # raw bits; widened to float32 on read
}
_NONCE = re.compile(r"^[0-9a-f]{8,32}$")
PayloadKind = Literal["r", "s"]


class PayloadError(WireError):
    """A frame that cannot be trusted: `reason` is "corrupt" (checksum, structure) or "invalid"."""

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """An encoded frame and what metadata says about it (`data` is not copied into bytes)."""

    data: bytearray
    checksum: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


def payload_key(key_prefix: str, kind: PayloadKind, sample_id: str, nonce: str) -> str:
    """The Redis key of a sample's rollout ("r") or scores ("s") frame."""
    return f"{key_prefix.rstrip(':')}:p{kind}:{sample_id}:{nonce}"


def shard_prefix(key_prefix: str, shard: int) -> str:
    """The key prefix of cache shard `shard` in a hash-tagged keyspace (`cache.shards > 1` or
    `redis.cluster`): `<prefix>:{<prefix>:s<shard>}`. Every key under it, the payload frames
    included, hashes to one Redis Cluster slot, so one script may touch all of them."""
    base = key_prefix.rstrip(":")
    return f"{base}:{{{base}:s{shard}}}"


_SHARD_TICKET = re.compile(r"^s(\d{1,4})\.")


def ticket_shard(ticket: str) -> int | None:
    """The shard that issued `ticket` (its tickets start with `s<shard>.`); None when the keyspace
    is not hash-tagged (a single, untagged store)."""
    m = _SHARD_TICKET.match(ticket)
    return int(m.group(1)) if m else None


def key_shard(key: str, key_prefix: str) -> int | None:
    """The shard whose tagged keyspace holds `key` (see `shard_prefix`), or None."""
    base = key_prefix.rstrip(":")
    head = f"{base}:{{{base}:s"
    if not key.startswith(head):
        return None
    digits, close, _ = key[len(head) :].partition("}")
    return int(digits) if close and digits.isdigit() and len(digits) <= 4 else None


def frame_prefix(key_prefix: str, ticket: str) -> str:
    """The prefix a rollout's frame key goes under: the keyspace of the shard its ticket came
    from (so the put script finds it in its own hash slot), or the run's own prefix."""
    shard = ticket_shard(ticket)
    return key_prefix if shard is None else shard_prefix(key_prefix, shard)


def scores_prefix(key_prefix: str, rollout_key: str) -> str:
    """The prefix a scores frame key goes under: its rollout frame's shard's (or the run's)."""
    shard = key_shard(rollout_key, key_prefix)
    return key_prefix if shard is None else shard_prefix(key_prefix, shard)


def check_key(key: str, key_prefix: str, kind: PayloadKind, sample_id: str, field: str) -> str:
    """Refuse a key that is not this sample's (a client must not make the cache touch other keys)."""
    head = payload_key(key_prefix, kind, sample_id, "")
    if not key.startswith(head) or not _NONCE.match(key[len(head) :]):
        raise WireError(f"{field}: {key!r} is not a payload key of this sample (expected {head}<hex nonce>)")
    return key


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode(kind: int, meta: dict[str, Any], tensors: dict[str, tuple[np.ndarray, str]]) -> Frame:
    """A frame of `tensors` (name -> (array, stored dtype)) and scalar `meta`.

    Each tensor is cast straight into its place in the frame (one pass, no temporary)."""
    table, arrays, offset = [], [], 0
    for name, (array, dtype) in tensors.items():
        a = np.asarray(array)
        table.append([name, dtype, list(a.shape), offset])
        arrays.append((offset, a, dtype))
        offset = _align(offset + a.size * _DTYPES[dtype].itemsize)
    header = json.dumps({"meta": meta, "tensors": table}, separators=(",", ":")).encode()
    start = _align(_PREFIX.size + len(header))
    body_len = arrays[-1][0] + arrays[-1][1].size * _DTYPES[arrays[-1][2]].itemsize if arrays else 0
    buf = bytearray(start + body_len)
    buf[_PREFIX.size : _PREFIX.size + len(header)] = header
    for off, a, dtype in arrays:
        dest = np.frombuffer(buf, dtype=_DTYPES[dtype], count=a.size, offset=start + off).reshape(a.shape)
        cast_into(dest, a, bfloat16=dtype == "bfloat16")
    checksum = crc32(memoryview(buf)[_PREFIX.size :])
    _PREFIX.pack_into(buf, 0, MAGIC, FORMAT, kind, 0, len(header), checksum, body_len)
    return Frame(buf, checksum)


@dataclass(frozen=True)
class _FrameTensors:
    arrays: dict[str, np.ndarray]

    def has(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name: str, field: str) -> np.ndarray:
        if name not in self.arrays:
            raise PayloadError(f"{field}: missing from the payload frame", "invalid")
        return self.arrays[name]


def decode(
    data: bytes, kind: int, checksum: int | None = None, field: str = "payload"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, name -> array) of a frame, after checking its structure and checksum(s)."""
    if len(data) < _PREFIX.size:
        raise PayloadError(f"{field}: {len(data)} bytes, shorter than a frame prefix")
    magic, fmt, got_kind, _, header_len, crc, body_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC or fmt != FORMAT:
        raise PayloadError(f"{field}: not a payload frame (magic {magic!r}, format {fmt})")
    if got_kind != kind:
        raise PayloadError(f"{field}: frame kind {got_kind}, expected {kind}")
    start = _align(_PREFIX.size + header_len)
    if header_len > _MAX_HEADER or start + body_len != len(data):
        raise PayloadError(f"{field}: header {header_len} + body {body_len} bytes do not make {len(data)}")
    actual = crc32(memoryview(data)[_PREFIX.size :])
    if actual != crc or (checksum is not None and actual != checksum):
        raise PayloadError(f"{field}: checksum mismatch (frame says {crc}, metadata {checksum}, bytes give {actual})")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
        meta, table = dict(header["meta"]), list(header["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadError(f"{field}: unreadable header ({exc})") from exc
    arrays: dict[str, np.ndarray] = {}
    for entry in table:
        try:
            name, dtype, shape, offset = str(entry[0]), str(entry[1]), [int(d) for d in entry[2]], int(entry[3])
            np_dt = _DTYPES[dtype]
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise PayloadError(f"{field}: bad tensor entry {entry!r}") from exc
        numel = math.prod(shape)
        nbytes = numel * np_dt.itemsize
        if min(shape, default=0) < 0 or offset < 0 or offset % ALIGN or offset + nbytes > body_len:
            raise PayloadError(f"{field}.{name}: shape {shape} at {offset} does not fit the {body_len}-byte body")
        a = np.frombuffer(data, dtype=np_dt, count=numel, offset=start + offset).reshape(shape)
        if dtype == "bfloat16":
            a = bf16_to_float32(a)
        arrays[name] = a
    return meta, arrays


# -- records -----------------------------------------------------------------------------------


def encode_rollout(r: Rollout, logprob_dtype: LogprobDType = "float16") -> Frame:
    meta = {
        "sample_id": r.sample_id,
        "prompt_id": r.prompt_id,
        "ticket": r.ticket,
        "task": [r.task.task, r.task.answer, r.task.prompt_text],
        "support_kind": int(r.support_kind),
        "replica": r.replica,
        "truncated": bool(r.truncated),
        "created_unix": float(r.created_unix),
    }
    tensors: dict[str, tuple[np.ndarray, str]] = {
        "prompt_ids": (r.prompt_ids, "int32"),
        "response_ids": (r.response_ids, "int32"),
        "behavior_logprobs": (r.behavior_logprobs, logprob_dtype),
        "versions": (r.versions, "int32"),
    }
    if r.support_ids is not None:
        tensors["support_ids"] = (r.support_ids, "int32")
    if r.support_logprobs is not None:
        tensors["support_logprobs"] = (r.support_logprobs, logprob_dtype)
    return encode(KIND_ROLLOUT, meta, tensors)


def encode_scores(s: TeacherScores, logprob_dtype: LogprobDType = "float16") -> Frame:
    tensors: dict[str, tuple[np.ndarray, str]] = {"token_logprobs": (s.token_logprobs, logprob_dtype)}
    if s.topk_ids is not None:
        tensors["topk_ids"] = (s.topk_ids, "int32")
    for name in ("topk_logprobs", "support_logprobs", "tail_logmass"):
        value = getattr(s, name)
        if value is not None:
            tensors[name] = (value, logprob_dtype)
    return encode(KIND_SCORES, {"sample_id": s.sample_id, "teacher": s.teacher}, tensors)


def _invalid(exc: WireError) -> PayloadError:
    return exc if isinstance(exc, PayloadError) else PayloadError(str(exc), "invalid")


def decode_rollout(
    data: bytes, limits: Limits, *, sample_id: str, checksum: int | None = None, field: str = "rollout"
) -> Rollout:
    """The validated rollout of a frame that must be `sample_id`'s (PayloadError otherwise)."""
    meta, arrays = decode(data, KIND_ROLLOUT, checksum, field)
    try:
        task = meta.get("task") or ["", "", ""]
        head = Rollout(
            sample_id=str(meta["sample_id"]),
            prompt_id=str(meta["prompt_id"]),
            ticket=str(meta["ticket"]),
            task=TaskInfo(str(task[0]), str(task[1]), str(task[2])),
            prompt_ids=_EMPTY,
            response_ids=_EMPTY,
            behavior_logprobs=_EMPTY,
            versions=_EMPTY,
            support_kind=SupportKind(int(meta["support_kind"])),
            replica=str(meta.get("replica", "")),
            truncated=bool(meta.get("truncated", False)),
            created_unix=float(meta.get("created_unix", 0.0)),
        )
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise PayloadError(f"{field}: bad rollout header ({exc})", "invalid") from exc
    if head.sample_id != sample_id:
        raise PayloadError(f"{field}: frame of {head.sample_id!r}, expected {sample_id!r}")
    try:
        return rollout_from_tensors(head, _FrameTensors(arrays), limits, field)
    except WireError as exc:
        raise _invalid(exc) from exc


def decode_scores(
    data: bytes,
    limits: Limits,
    *,
    sample_id: str,
    num_tokens: int | None = None,
    support_size: int | None = None,
    checksum: int | None = None,
    field: str = "scores",
) -> TeacherScores:
    """The validated scores of a frame that must be `sample_id`'s (PayloadError otherwise)."""
    meta, arrays = decode(data, KIND_SCORES, checksum, field)
    if str(meta.get("sample_id")) != sample_id:
        raise PayloadError(f"{field}: frame of {meta.get('sample_id')!r}, expected {sample_id!r}")
    try:
        return scores_from_tensors(
            sample_id,
            str(meta.get("teacher", "")),
            _FrameTensors(arrays),
            limits,
            num_tokens=num_tokens,
            support_size=support_size,
            field=field,
        )
    except WireError as exc:
        raise _invalid(exc) from exc


_EMPTY = np.zeros(0, np.int32)


@dataclass(frozen=True)
class _RecordTensors:
    record: Any

    def has(self, name: str) -> bool:
        return getattr(self.record, name, None) is not None

    def get(self, name: str, field: str) -> np.ndarray:
        return np.asarray(getattr(self.record, name))


def check_rollout(r: Rollout, limits: Limits, field: str = "rollout") -> None:
    """A producer's own check before it writes a frame (the same rules a reader applies)."""
    rollout_from_tensors(r, _RecordTensors(r), limits, field)


def check_scores(s: TeacherScores, limits: Limits, num_tokens: int, support_size: int | None, field: str) -> None:
    """A teacher's own check of its scores against the rollout they score."""
    scores_from_tensors(
        s.sample_id, s.teacher, _RecordTensors(s), limits, num_tokens=num_tokens, support_size=support_size, field=field
    )
