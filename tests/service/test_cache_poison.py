"""Poison caps: a sample whose teacher lease or batch claim keeps running out is handed out at
most `cache.max_deliveries` times, then dropped as `poison` with its payload frames, and the
accounting stays exact. Leases are found by score (sorted sets), not by walking a stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from asyncopd.cache import scripts
from asyncopd.wire.cache_client import CacheStats
from test_cache_harness import SHARED_REDIS, make_config, make_rollout, make_scores, running_cache, unique_prefix

pytestmark = pytest.mark.service


def _until(get: Callable[[], Any], deadline_s: float = 20.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        value = get()
        if value:
            return value
        assert time.monotonic() < deadline, f"not met within {deadline_s} s"
        time.sleep(0.02)


def _frames(prefix: str, kind: str = "[rs]") -> list[bytes]:
    """Payload frame keys of the run (rollouts "r", scores "s")."""
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        return sorted(client.scan_iter(match=f"{prefix}:*p{kind}:*", count=1000))
    finally:
        client.close()


def _exact(stats: CacheStats) -> None:
    assert stats.invariant_holds(), stats
    assert stats.in_flight == sum(stats.queue_depth[q] for q in ("unscored", "scoring", "scored", "claimed"))


def test_a_rollout_whose_teachers_never_return_is_dropped_as_poison_after_max_deliveries() -> None:
    prefix = unique_prefix("poison-t")
    config = make_config(prefix, **{"cache.teacher_lease_s": 0.2, "cache.max_deliveries": 3})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        bad, good = (f"{p.ticket}/s" for p in prompts)
        deliveries = []
        for _ in range(3):  # delivered 3 times: each teacher dies (never answers)
            got = _until(lambda: client.claim_rollouts("t-crash", 2, wait_ms=50))
            assert sorted(r.sample_id for r in got) == sorted([bad, good])
            deliveries.append(got)
        # on its 3rd (last) delivery `good` is scored; `bad` never is
        scored = next(r for r in deliveries[-1] if r.sample_id == good)
        assert client.put_scores([make_scores(scored)]).accepted == 1
        # once the last lease runs out, `bad` is dropped instead of handed out a 4th time
        deadline = time.monotonic() + 20.0
        while client.stats_snapshot().dropped.get("poison", 0) == 0:
            assert client.claim_rollouts("t-next", 2, wait_ms=50) == [], "delivered past max_deliveries"
            assert time.monotonic() < deadline
        stats = client.stats_snapshot()
        assert stats.dropped == {"poison": 1} and stats.produced == 2 and stats.in_flight == 1
        assert stats.queue_depth["scored"] == 1 and stats.queue_depth["scoring"] == 0
        assert stats.counters["redelivered"] == 4  # both, twice each
        _exact(stats)
        # its frame went with it; the scored one keeps both of its frames
        assert len(_frames(prefix, "r")) == 1 and len(_frames(prefix, "s")) == 1
        # its admission slot is free again: the window (eta + 1) * B = 8 holds 1 sample now
        assert len(client.acquire_prompts("r0", 8)[0]) == 7


def test_a_batch_whose_claims_keep_expiring_is_dropped_as_poison_after_max_deliveries() -> None:
    prefix = unique_prefix("poison-b")
    config = make_config(prefix, **{"learner.batch_size": 2, "cache.batch_claim_s": 0.2, "cache.max_deliveries": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        client.put_scores([make_scores(r) for r in client.claim_rollouts("t0", 2)])
        first = client.pull_batch(2, 0)
        assert first is not None
        # the learner dies; the claim runs out and the samples are served again (2nd claim)
        second = _until(lambda: client.pull_batch(2, 0, wait_ms=50))
        assert sorted(s.rollout.sample_id for s in second.samples) == sorted(s.rollout.sample_id for s in first.samples)
        assert client.stats_snapshot().dropped == {}
        # it dies again: after the 2nd claim runs out they are poison, not a 3rd batch
        deadline = time.monotonic() + 20.0
        while client.stats_snapshot().dropped.get("poison", 0) == 0:
            assert client.pull_batch(2, 0, wait_ms=50) is None, "claimed past max_deliveries"
            assert time.monotonic() < deadline
        stats = client.stats_snapshot()
        assert stats.dropped == {"poison": 2} and stats.trained == 0 and stats.in_flight == 0
        assert stats.counters["batches_returned"] == 2
        _exact(stats)
        assert _frames(prefix) == []


def test_no_stream_walks_are_left() -> None:
    for name in scripts.NAMES:
        src = scripts.source(name).upper()
        assert "XAUTOCLAIM" not in src and "XREADGROUP" not in src and "XADD" not in src, name


def test_queue_entries_without_their_sample_are_skipped_and_removed() -> None:
    prefix = unique_prefix("poison-orphan")
    with running_cache(make_config(prefix)) as (cache, client):
        prompts, _, _ = client.acquire_prompts("r0", 1)
        client.put_rollouts([make_rollout(prompts[0], 0)])
        raw = redis.Redis.from_url(SHARED_REDIS)
        try:
            # entries whose sample hash is gone (part of the state lost): one queued, one leased and expired
            raw.zadd(cache.store.key("ready"), {"ghost-ready": 0})
            raw.zadd(cache.store.key("tclaim"), {"ghost-leased": 1})
            got = client.claim_rollouts("t0", 4)
            assert [r.sample_id for r in got] == [f"{prompts[0].ticket}/s"]
            assert raw.zcard(cache.store.key("ready")) == 0
            assert raw.zrange(cache.store.key("tclaim"), 0, -1) == [got[0].sample_id.encode()]
        finally:
            raw.close()
        _exact(client.stats_snapshot())
