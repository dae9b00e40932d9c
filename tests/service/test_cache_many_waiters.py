"""A cache serving more concurrent waiting calls than redis-py's default pool (100 connections): 240
replicas long-poll AcquirePrompts while the admission window is held, as an idle fleet does. Every
call must be answered without a Redis error: the cache's pool holds a connection per gRPC worker
(without that, the calls beyond 100 failed with 'Too many connections' and were retried)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import make_config, running_cache, unique_prefix

pytestmark = pytest.mark.service

REPLICAS = 240


def test_more_waiters_than_the_default_pool_cause_no_redis_errors() -> None:
    workers: dict[str, Any] = {"cache.server.workers": REPLICAS + 8}
    config = make_config(unique_prefix("waiters"), **workers)
    with running_cache(config) as (cache, control):
        held = control.acquire_prompts("holder", 64)[0]
        assert len(held) == 8  # (eta + 1) * B: nobody else is admitted now
        channels = [channel(cache.address) for _ in range(8)]
        clients = [CacheClient(ch, timeout_s=60.0) for ch in channels]
        answers: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(REPLICAS)

        def replica(i: int) -> None:
            try:
                start.wait()
                for _ in range(3):
                    answers.append(len(clients[i % len(clients)].acquire_prompts(f"r{i}", 2, wait_ms=300)[0]))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=replica, args=(i,)) for i in range(REPLICAS)]
        try:
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=60)
        finally:
            for ch in channels:
                ch.close()
        assert not errors, errors[:3]
        assert answers == [0] * (3 * REPLICAS)
        assert control.stats_snapshot().redis_errors == 0
