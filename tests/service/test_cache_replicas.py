"""Several cache replicas on one Redis serve one client: the client's channel balances its RPCs
round-robin over every address its target resolves to (as over a headless Service's pods), and
the two stateless processes share one run state (exact accounting across both)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from asyncopd.cache.main import RunningCache, start_cache
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import (
    VOCAB,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    tiny_prompts,
    tokenize,
    unique_prefix,
)

pytestmark = pytest.mark.service


def _count(cache: RunningCache, method: str) -> list[int]:
    calls = [0]
    inner = getattr(cache.store, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    setattr(cache.store, method, counted)
    return calls


def test_two_cache_processes_serve_one_client_round_robin() -> None:
    config = make_config(unique_prefix("replicas"), max_staleness=3, **{"learner.batch_size": 2})
    with running_cache(config) as (first, _):
        second = start_cache(
            config, "cache-2", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False
        )
        # one target, two addresses (what DNS answers for a headless Service with two pods)
        ch = channel(f"ipv4:{first.address},{second.address}")
        try:
            client = CacheClient(ch, timeout_s=30.0)
            counts = [_count(first, "acquire"), _count(second, "acquire")]
            prompts = []
            for _ in range(8):
                prompts += client.acquire_prompts("r0", 1)[0]
            assert len(prompts) == 8 and len({p.ticket for p in prompts}) == 8
            assert counts[0][0] > 0 and counts[1][0] > 0, f"one replica took every call: {counts}"
            assert abs(counts[0][0] - counts[1][0]) <= 2, counts
            client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
            client.put_scores([make_scores(r) for r in client.claim_rollouts("t0", 8)])
            for _ in range(4):
                batch = client.pull_batch(2, 0)
                assert batch is not None and client.ack_batch(batch.batch_id) == 2
            stats = client.stats_snapshot()
            assert (stats.produced, stats.trained, stats.in_flight) == (8, 8, 0) and stats.invariant_holds()
        finally:
            ch.close()
            second.stop(grace=0.5)


def test_a_replica_that_missed_a_publish_checks_token_versions_against_redis() -> None:
    """PutRollouts checks token versions against the newest version its process has seen (no
    Redis read); a version another replica published since is read from Redis before a rollout
    carrying it is called from the future, and one that is from the future is still refused."""
    config = make_config(unique_prefix("replicas-ver"), max_staleness=3, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        second = start_cache(
            config, "cache-2", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False
        )
        ch = channel(second.address)
        try:
            other = CacheClient(ch, timeout_s=30.0)
            prompts = other.acquire_prompts("r0", 2)[0]
            assert second.store.known_version() == 0
            client.publish_version(5)  # through the first process; the second has not seen it
            assert second.store.known_version() == 0
            assert other.put_rollouts([make_rollout(prompts[0], 5, seed=0)]).accepted == 1
            assert second.store.known_version() == 5
            with pytest.raises(grpc.RpcError) as err:
                other.put_rollouts([make_rollout(prompts[1], 7, seed=1)])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "version 7 is from the future (the learner published 5" in str(err.value.details())
            stats = other.stats_snapshot()
            assert stats.produced == 1 and stats.invariant_holds()
        finally:
            ch.close()
            second.stop(grace=0.5)
