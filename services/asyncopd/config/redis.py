"""How the cache service reaches Redis. The password is a secret: never logged or reported."""

from __future__ import annotations

from pydantic import Field, SecretStr

from asyncopd.config.base import Section


class RedisConfig(Section):
    """Connection to the Redis that backs the cache service."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^(redis|rediss|unix)://",
        description="redis:// or rediss:// (TLS) or unix:// URL, without the password.",
    )
    password: SecretStr | None = Field(
        None, description="Redis password (or read from ASYNCOPD_REDIS_PASSWORD); never logged."
    )
    username: str | None = Field(None, description="Redis ACL user name, if ACLs are used.")
    key_prefix: str = Field(
        "asyncopd", min_length=1, description="Prefix of every key, so several runs can share a Redis."
    )
    tls_ca_file: str | None = Field(None, description="CA bundle to verify a rediss:// server.")
    cluster: bool = Field(
        False,
        description="url names a node of a Redis Cluster: clients follow the cluster's slot map, and the cache keeps "
        "each shard's keys (payload frames included) under one hash tag so every script runs on one node.",
    )
