"""Payload frames in Redis, read and written by the services that produce and consume them.

Rollout replicas and teachers `write` their frames (`asyncopd.wire.payload`) with a TTL, then
send the cache only metadata; the cache's put script makes an accepted frame permanent
(PERSIST) and deletes it with its sample (trained, dropped, evicted) in the same atomic step. A
frame whose metadata never arrived (the producer crashed in between) expires after `ttl_s`.
Teachers and the learner `read` frames in chunks of at most `chunk_bytes` (one MGET each), so a
batch of any size streams through bounded replies.

Frames are megabytes: a write hands redis-py a `memoryview` of each, which its serializer sends
as is (a bytes or bytearray value goes through `hiredis.pack_command`, a copy at ~0.7 GB/s);
clients read with `READ_SIZE`-byte socket reads (redis-py's 64 KiB means ~25 reads, and as many
parser calls, per 1.5 MiB frame). And a process that makes a PayloadStore keeps the memory of
freed frames for the next ones (`retain_freed_memory`): glibc maps each allocation over 128 KiB
afresh and hands it back when freed, so every frame read or encoded faulted in its pages anew —
~400 page faults per 1.6 MB frame, 2–3x the CPU of reading it.

It knows the key layout (`payload_key`) and the Redis connection settings (`RedisConfig`); it
knows nothing of admission, budgets or accounting (the cache's).
"""

from __future__ import annotations

import ctypes
import functools
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import grpc
import redis

from asyncopd.config.redis import RedisConfig
from asyncopd.wire.payload import PayloadKind, payload_key

READ_SIZE = 256 << 10  # socket read size of payload clients (a buffer of it per connection)

P = ParamSpec("P")
T = TypeVar("T")


class PayloadStoreUnavailable(grpc.RpcError):
    """Redis cannot be reached for payloads right now (restarting, loading its AOF, a network cut).

    It answers `code()` UNAVAILABLE like a gRPC error, so every client loop that already rides
    through an unreachable cache (`asyncopd.wire.rpc.retryable`: the rollout and teacher work
    loops, the learner's cache calls) waits and retries it the same way, instead of dying on a
    redis-py exception it does not know."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _unavailable_as_rpc_error(method: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError included
            raise PayloadStoreUnavailable(f"payload store: {method.__name__}: {exc}") from exc

    return wrapper


def connect(config: RedisConfig, socket_timeout_s: float = 30.0) -> redis.Redis:
    """A client for `config.url` with its ACL user, password and TLS CA (no driver retries)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "socket_read_size": READ_SIZE,
    }
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    if config.username is not None:
        kwargs["username"] = config.username
    if config.url.startswith("rediss://") and config.tls_ca_file:
        kwargs["ssl_ca_certs"] = config.tls_ca_file
    if config.cluster:
        # typed as redis.Redis: the cluster client answers the same commands
        return cast(redis.Redis, redis.RedisCluster.from_url(config.url, **kwargs))
    return redis.Redis.from_url(config.url, **kwargs)


def mget(client: redis.Redis, keys: Sequence[str]) -> list[Any]:
    """MGET; on a Redis Cluster one per hash slot (a batch's frames live in several shards)."""
    if isinstance(client, redis.RedisCluster):
        return list(client.mget_nonatomic(list(keys)))
    return list(client.mget(list(keys)))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache  # once per process (a second, concurrent first call sets the same values)
def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations under `mmap_threshold` (glibc's largest) from the heap and return freed
    memory to the OS only past `trim_threshold` free at its top, so a frame's memory is reused by
    the next frame instead of being unmapped and faulted in again. True when in effect (False:
    not glibc, nothing changed). The process's resident memory then stays at its peak (a
    learner's batch of frames, which the next batch needs again)."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")  # glibc answers it; musl and others do not
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own libc, no lookup
    return bool(
        mallopt is not None
        and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


class PayloadStore:
    """Frames of one run (`key_prefix`, the cache's `redis.key_prefix`) in `client`'s Redis."""

    def __init__(self, client: redis.Redis, key_prefix: str, ttl_s: float = 600.0, chunk_bytes: int = 32 << 20) -> None:
        retain_freed_memory()  # this process moves frames: keep their memory for the next ones
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.redis = client
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.chunk_bytes = chunk_bytes

    @classmethod
    def from_config(cls, config: RedisConfig, ttl_s: float = 600.0) -> PayloadStore:
        return cls(connect(config), config.key_prefix, ttl_s)

    def new_key(self, kind: PayloadKind, sample_id: str, prefix: str | None = None) -> str:
        """A fresh key for a frame of `sample_id` (a random nonce: re-sends never collide), under
        `prefix` (default the run's): a sharded cache wants a rollout's frame in its ticket's shard
        (`payload.frame_prefix`) and the scores next to their rollout (`payload.scores_prefix`)."""
        return payload_key(prefix or self.prefix, kind, sample_id, uuid.uuid4().hex[:16])

    @_unavailable_as_rpc_error
    def write(self, items: Sequence[tuple[str, bytes | bytearray]]) -> None:
        """SET each (key, frame) with the orphan TTL, pipelined in chunks."""
        for chunk in self._chunks([len(v) for _, v in items]):
            pipe = self.redis.pipeline(transaction=False)
            for i in chunk:
                key, frame = items[i]
                pipe.set(key, memoryview(frame), px=self.ttl_ms)  # sent as is, not packed (a copy)
            pipe.execute()

    @_unavailable_as_rpc_error
    def read(self, keys: Sequence[str], sizes: Sequence[int]) -> list[bytes | None]:
        """The frames at `keys` (None where gone); `sizes` (from metadata) bound each MGET."""
        out: list[Any] = []
        for chunk in self._chunks(sizes):
            out += mget(self.redis, [keys[i] for i in chunk])
        return out  # bytes (the client does not decode responses)

    @_unavailable_as_rpc_error
    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self.redis.delete(*keys)

    def close(self) -> None:
        self.redis.close()

    def _chunks(self, sizes: Sequence[int]) -> Iterator[range]:
        lo, total = 0, 0
        for i, n in enumerate(sizes):
            if i > lo and total + n > self.chunk_bytes:
                yield range(lo, i)
                lo, total = i, 0
            total += n
        if lo < len(sizes):
            yield range(lo, len(sizes))
