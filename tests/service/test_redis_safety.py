"""The cache and the Redis it keeps samples in, each on a redis-server of our own: a Redis that
may evict keys is refused at start (naming the setting), a Redis that will not say (CONFIG GET
refused, as on managed services) is accepted with a warning, and a Redis out of memory refuses
puts as RESOURCE_EXHAUSTED (the producer backs off) instead of an unknown error; once memory is
back the same put goes through."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from asyncopd.cache.connection import CommandPacker, UnsafeRedis, connect
from asyncopd.cache.main import start_cache
from asyncopd.config.redis import RedisConfig
from asyncopd.wire.cache_client import CacheFull
from redis.connection import Connection
from test_cache_harness import VOCAB, PrivateRedis, make_config, make_rollout, running_cache, tiny_prompts, tokenize

pytestmark = pytest.mark.service


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def admin(server: PrivateRedis) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5)


def test_a_redis_that_evicts_keys_is_refused_at_start(private_redis: PrivateRedis) -> None:
    admin(private_redis).config_set("maxmemory-policy", "allkeys-lru")
    config = make_config("evicting", private_redis.url)
    with pytest.raises(UnsafeRedis) as info:
        start_cache(
            config, "cache-lru", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False
        )
    assert "maxmemory-policy" in str(info.value) and "allkeys-lru" in str(info.value)
    assert "noeviction" in str(info.value)  # says what to set


def test_a_redis_that_will_not_show_its_config_is_used_with_a_warning(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    admin(private_redis).acl_setuser("app", enabled=True, passwords=["+app-pw"], keys=["*"], channels=["*"],
                                     commands=["+@all", "-config"])  # fmt: skip
    monkeypatch.setenv("ASYNCOPD_REDIS_PASSWORD", "app-pw")
    config = make_config("managed", private_redis.url, **{"redis.username": "app"})
    caplog.set_level(logging.WARNING, logger="asyncopd.cache.connection")
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        assert prompts  # the cache serves
    assert "maxmemory-policy" in caplog.text and "noeviction" in caplog.text


def test_redis_out_of_memory_is_resource_exhausted_and_the_put_succeeds_later(private_redis: PrivateRedis) -> None:
    config = make_config("oom", private_redis.url, **{"cache.byte_budget_mb": 1024})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        rollouts = [make_rollout(p, 0, sample_id=f"{p.ticket}/s") for p in prompts]
        admin(private_redis).config_set("maxmemory", "1")  # below what Redis already uses: every write is OOM
        try:
            with pytest.raises(CacheFull) as info:
                client.put_rollouts(rollouts)
            assert "out of memory" in str(info.value)  # CacheFull = the RESOURCE_EXHAUSTED status
            assert client.stats_snapshot().produced == 0  # reads still answer; nothing half-written
        finally:
            admin(private_redis).config_set("maxmemory", "256mb")
        assert client.put_rollouts(rollouts).accepted == len(rollouts)
        assert client.stats_snapshot().produced == len(rollouts)


def test_the_chart_runs_redis_with_noeviction() -> None:
    template = (Path(__file__).resolve().parents[2] / "charts/asyncopd/templates/redis.yaml").read_text()
    assert "--maxmemory-policy noeviction" in template


def test_the_cache_client_packs_with_hiredis_and_round_trips_text(private_redis: PrivateRedis) -> None:
    """`connect` gives every connection `CommandPacker`; text, numbers and scripts round-trip."""
    client = connect(RedisConfig(url=private_redis.url), max_connections=4)
    try:
        conn = client.connection_pool.make_connection()
        assert isinstance(conn, Connection) and isinstance(conn._command_packer, CommandPacker)
        key = "asyncopd-test:packer"
        client.set(key, "välue", px=5000)
        assert client.get(key) == "välue".encode()
        assert client.eval("return {ARGV[1], ARGV[2]}", 0, 7, "ü") == [b"7", "ü".encode()]
        client.delete(key)
    finally:
        client.close()
