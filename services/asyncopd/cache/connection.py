"""A redis-py client from the run's `redis` config section (URL, ACL user, password, TLS CA),
and the checks that the Redis behind it is safe to keep samples in.

The client does not retry by itself: `ExperienceStore` retries with backoff and counts every
failure, so a Redis restart is visible in the stats rather than hidden in the driver. A write
Redis refuses for lack of memory (OOM under `maxmemory`) raises `RedisFull`, a
`ResourceExhausted`: the servicer answers RESOURCE_EXHAUSTED and producers back off, as when the
cache's own byte budget is full. `check_eviction_policy` refuses a Redis that may evict keys.
With `redis.cluster` the client is a `RedisCluster` (it routes each script by its KEYS[1], the
shard's hash-tagged prefix, and each command by its key).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import hiredis
import redis
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from asyncopd.config.redis import RedisConfig
from asyncopd.wire.rpc import ResourceExhausted

log = logging.getLogger(__name__)


class RedisFull(ResourceExhausted, redis.ResponseError):
    """Redis refused a write: it is at `maxmemory` and evicts nothing (OOM)."""


def _full(exc: redis.exceptions.OutOfMemoryError) -> RedisFull:
    return RedisFull(
        f"Redis is out of memory (maxmemory reached; nothing is evicted): {exc}; retry after the learner consumes"
    )


class _Pipeline(Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except redis.exceptions.OutOfMemoryError as exc:
            raise _full(exc) from exc


class _Redis(redis.Redis):
    """redis.Redis whose OOM refusals are `RedisFull` (for commands, scripts and pipelines)."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)
        except redis.exceptions.OutOfMemoryError as exc:
            raise _full(exc) from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _RedisCluster(RedisCluster):
    """RedisCluster whose OOM refusals are `RedisFull` (commands and scripts; pipelines raise redis-py's)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError as exc:
            raise _full(exc) from exc


class CommandPacker:
    """redis-py's `command_packer` for the cache's client: one `hiredis.pack_command` call per
    command. redis-py's own packer first passes every argument through its encoder in Python
    (five `isinstance` checks each); a script call carries 10-300 metadata arguments, and that
    pass was the cache's largest Python cost per request. hiredis packs str (UTF-8), int, float
    (as `repr`) and bytes-like arguments the way that encoder does; for anything else (a bool or
    None, which redis-py refuses; a bytearray) and for a command name holding a space (`"SCRIPT
    LOAD"`), redis-py's pure-Python packer takes over, with its checks and errors."""

    def __init__(self) -> None:
        self._fallback = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)

    def pack(self, *args: Any) -> list[Any]:
        head = args[0]
        if (" " if isinstance(head, str) else b" ") in head:
            return self._fallback.pack(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return self._fallback.pack(*args)


class UnsafeRedis(RuntimeError):
    """The Redis configuration would lose samples silently."""


def check_eviction_policy(client: redis.Redis) -> str | None:
    """Refuse a Redis whose `maxmemory-policy` is not `noeviction`: an `allkeys-*` or
    `volatile-*` policy deletes samples, counters and claims behind the cache's back instead of
    refusing writes. Returns the policy, or None when Redis will not say (managed services often
    refuse CONFIG GET): then a warning, and the operator's word is taken for it. On a Redis
    Cluster every master is asked (each holds some shards)."""
    if isinstance(client, RedisCluster):
        policies = {_policy(client, node) for node in client.get_primaries()}
        return policies.pop() if len(policies) == 1 else None
    return _policy(client)


def _policy(client: redis.Redis | RedisCluster, node: Any = None) -> str | None:
    where = "" if node is None else f" on {node.name}"
    try:
        if node is None:
            reply = client.config_get("maxmemory-policy")
        else:
            reply = client.config_get("maxmemory-policy", target_nodes=node)  # type: ignore[call-arg]
    except redis.ResponseError as exc:
        log.warning(
            "could not read Redis maxmemory-policy (%s); make sure it is 'noeviction', or samples and "
            "counters may be evicted silently",
            exc,
        )
        return None
    policy = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy is None:
        log.warning("Redis did not report maxmemory-policy; make sure it is 'noeviction'")
        return None
    if policy != "noeviction":
        raise UnsafeRedis(
            f"Redis maxmemory-policy{where} is {policy!r}: it would evict samples, counters and claims silently. "
            "Set maxmemory-policy noeviction (redis.conf, CONFIG SET maxmemory-policy noeviction, or your "
            "managed Redis's parameter group); the cache then refuses writes when full (RESOURCE_EXHAUSTED)."
        )
    return str(policy)


def connect(config: RedisConfig, socket_timeout_s: float = 30.0, max_connections: int | None = None) -> redis.Redis:
    """A client for `config.url`; `socket_timeout_s` must exceed the longest blocking read.
    `max_connections` bounds its pool (per node on a cluster): at least the threads that use it at
    once, or the rest fail with 'Too many connections' (redis-py's default pool holds 100)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "command_packer": CommandPacker(),
    }
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    if config.username is not None:
        kwargs["username"] = config.username
    if config.url.startswith("rediss://") and config.tls_ca_file:
        kwargs["ssl_ca_certs"] = config.tls_ca_file
    if config.cluster:
        del kwargs["retry"]  # the cluster client retries MOVED/ASK redirections itself
        # typed as redis.Redis: the cluster client answers the same commands (scripts by KEYS[1])
        return cast(redis.Redis, _RedisCluster.from_url(config.url, **kwargs))
    return _Redis.from_url(config.url, **kwargs)


def delete_prefix(client: redis.Redis, prefix: str, batch: int = 500) -> int:
    """Delete every key under `prefix:` (one run's key space) in batches; returns how many."""
    deleted = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        keys.append(key)
        if len(keys) >= batch:
            deleted += int(client.delete(*keys))
            keys = []
    if keys:
        deleted += int(client.delete(*keys))
    return deleted
