"""A redis-py client from the run's `redis` config section (URL, ACL user, password, TLS CA).

The client does not retry by itself: `ExperienceStore` retries with backoff and counts every
failure, so a Redis restart is visible in the stats rather than hidden in the driver.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from asyncopd.config.redis import RedisConfig


def connect(config: RedisConfig, socket_timeout_s: float = 30.0) -> redis.Redis:
    """A client for `config.url`; `socket_timeout_s` must exceed the longest blocking read."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    if config.username is not None:
        kwargs["username"] = config.username
    if config.url.startswith("rediss://") and config.tls_ca_file:
        kwargs["ssl_ca_certs"] = config.tls_ca_file
    return redis.Redis.from_url(config.url, **kwargs)


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
