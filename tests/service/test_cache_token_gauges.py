"""The cache's token-budget and masked-sample gauges, read from a real Prometheus registry after
the recorder copies a real store's Redis counters into it (what the cache's gauge refresher does):
asyncopd_cache_tokens_reserved follows cnt.tok_reserved as tickets are handed out and answered,
asyncopd_cache_token_budget is the configured budget, asyncopd_cache_masked_samples counts the
samples served with tokens beyond the bound (stale_tokens: mask), per store and summed over shards."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from asyncopd.cache.main import store_policy
from asyncopd.cache.recorder import MetricsRecorder
from asyncopd.cache.shards import ShardedStore
from asyncopd.cache.store import ExperienceStore, PayloadRef, StoredRollout, StoredScores
from asyncopd.observability import metrics
from asyncopd.wire import payload
from asyncopd.wire.payload import payload_key
from test_cache_harness import SHARED_REDIS, make_config, unique_prefix, wipe

pytestmark = pytest.mark.service

LABELS = {"service": "cache", "replica": "c"}


def _gauges(registry: metrics.ServiceRegistry) -> tuple[float | None, float | None, float | None]:
    return tuple(  # type: ignore[return-value]
        registry.get_sample_value(name, LABELS)
        for name in ("asyncopd_cache_tokens_reserved", "asyncopd_cache_token_budget", "asyncopd_cache_masked_samples")
    )


def _frame(client: redis.Redis, prefix: str, kind: str, sid: str) -> PayloadRef:
    ref = PayloadRef(payload_key(prefix, kind, sid, "00000000"), 8, 0)  # type: ignore[arg-type]
    client.set(ref.key, b"x" * 8)
    return ref


def test_reserved_tokens_budget_and_masked_samples_reach_the_registry() -> None:
    prefix = unique_prefix("tokgauge")
    values: dict[str, Any] = {"rollout.sampling.max_tokens": 100, "cache.max_tokens_in_flight": 250}
    config = make_config(prefix, max_staleness=2, stale_tokens="mask", **values)
    policy = store_policy(config)
    client = redis.Redis.from_url(SHARED_REDIS)
    registry = metrics.ServiceRegistry("cache", "c", process_metrics=False)
    recorder = MetricsRecorder(metrics.CacheMetrics(registry), policy)
    try:
        store = ExperienceStore(client, prefix, policy)
        recorder.refresh(store.stats())
        assert _gauges(registry) == (0.0, 250.0, 0.0)

        tickets = store.acquire("r0", 5).tickets  # the budget fits two tickets of 100
        assert len(tickets) == 2
        recorder.refresh(store.stats())
        assert _gauges(registry) == (200.0, 250.0, 0.0)

        # one rollout crosses the bound at version 5 (oldest usable 3): its version-2 tokens are masked
        store.publish_version(5)
        rollouts = [
            StoredRollout(sid, t.ticket, ov, 10, 0, _frame(client, prefix, "r", sid), 3)
            for t, (sid, ov) in zip(tickets, [("fresh", 3), ("crossing", 2)], strict=True)
        ]
        assert store.put_rollouts(rollouts).accepted == 2
        recorder.refresh(store.stats())
        assert _gauges(registry) == (0.0, 250.0, 0.0), "answered tickets hold no tokens"
        claimed = store.claim_rollouts("t0", 2).samples
        store.put_scores([StoredScores(m.sample_id, _frame(client, prefix, "s", m.sample_id)) for m in claimed])
        batch = store.pull_batch(2, 5, "learner").batch
        assert batch is not None and store.ack_batch(batch.batch_id) == 2
        recorder.refresh(store.stats())
        assert _gauges(registry) == (0.0, 250.0, 1.0)
    finally:
        client.close()
        wipe(SHARED_REDIS, prefix)


def test_sharded_gauges_add_the_shards_up() -> None:
    prefix = unique_prefix("tokgauge-shards")
    values: dict[str, Any] = {"rollout.sampling.max_tokens": 100, "cache.max_tokens_in_flight": 400, "cache.shards": 2}
    config = make_config(prefix, **values)
    policy = store_policy(config)
    client = redis.Redis.from_url(SHARED_REDIS)
    registry = metrics.ServiceRegistry("cache", "c", process_metrics=False)
    recorder = MetricsRecorder(metrics.CacheMetrics(registry), policy)
    store = ShardedStore(client, prefix, policy, shards=2)
    try:
        tickets = store.acquire("r0", 8).tickets  # 200 tokens per shard: two tickets each
        assert len(tickets) == 4 and {payload.ticket_shard(t.ticket) for t in tickets} == {0, 1}
        recorder.refresh(store.stats())
        assert _gauges(registry) == (400.0, 400.0, 0.0)
        assert store.release("r0", [tickets[0].ticket]) == 1
        recorder.refresh(store.stats())
        assert _gauges(registry)[0] == 300.0
    finally:
        store.close()
        wipe(SHARED_REDIS, prefix)
