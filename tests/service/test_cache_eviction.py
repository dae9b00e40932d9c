"""The finite teacher-score cache under a tiny byte budget, on a private redis-server: each
eviction policy picks the victim it promises, every drop is counted, backpressure refuses
puts (storing nothing) until the learner consumes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncopd.config import RunConfig
from asyncopd.records import Prompt, Rollout, TeacherScores
from asyncopd.wire import rollout_to_proto, scores_to_proto
from asyncopd.wire.cache_client import CacheClient, CacheFull
from asyncopd.wire.convert import rollout_from_proto, scores_from_proto
from test_cache_harness import PrivateRedis, make_config, make_rollout, make_scores, running_cache, unique_prefix

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(Path(tmp_path_factory.mktemp("redis-evict"))).start()
    try:
        yield server
    finally:
        server.stop()


def stored_bytes(r: Rollout, s: TeacherScores | None = None) -> int:
    """What the cache counts: the payload frames of the validated records, float16 log-probs."""
    from asyncopd.wire import payload
    from asyncopd.wire.convert import Limits

    r2 = rollout_from_proto(rollout_to_proto(r), Limits())
    n = payload.encode_rollout(r2, "float16").nbytes
    if s is not None:
        s2 = scores_from_proto(scores_to_proto(s), Limits())
        n += payload.encode_scores(s2, "float16").nbytes
    return n


def fill(client: CacheClient, version_of: dict[str, int]) -> tuple[list[Prompt], dict[str, Rollout]]:
    """Samples A-D scored (put A, B, C, D; scored D, C, B, A) and E put but unscored."""
    prompts, _, _ = client.acquire_prompts("r0", 5)
    names = "ABCDE"
    rollouts = {
        n: make_rollout(p, version_of.get(n, 1), sample_id=f"s{n}", seed=i)
        for i, (n, p) in enumerate(zip(names, prompts, strict=True))
    }
    client.put_rollouts([rollouts[n] for n in "ABCD"])
    claimed = {r.sample_id: r for r in client.claim_rollouts("t0", 4)}
    for n in "DCBA":
        client.put_scores([make_scores(claimed[f"s{n}"])])
        time.sleep(0.005)  # LRU order is by millisecond clock
    client.put_rollouts([rollouts["E"]])
    return prompts, rollouts


def budget_for(rollouts: dict[str, Rollout]) -> float:
    """Room for A-D scored plus E scored, minus one byte: scoring E must evict exactly one."""
    full = sum(stored_bytes(rollouts[n], make_scores(rollouts[n])) for n in "ABCDE")
    return (full - 1) / float(1 << 20)


VERSIONS = {"A": 1, "B": 0, "C": 1, "D": 1, "E": 1}


def _run_with_budget(redis_url: str, policy: str, prefix: str) -> tuple[RunConfig, dict[str, Rollout]]:
    # First pass with an ample budget only to learn the exact sizes (same records, same seeds).
    probe = make_config(prefix + "-probe", redis_url, max_staleness=1, **{"learner.batch_size": 5})
    with running_cache(probe) as (_, client):
        client.publish_version(1)
        _, rollouts = fill(client, VERSIONS)
    config = make_config(
        prefix,
        redis_url,
        max_staleness=1,
        **{"learner.batch_size": 5, "cache.eviction": policy, "cache.byte_budget_mb": budget_for(rollouts)},
    )
    return config, rollouts


@pytest.mark.parametrize(("policy", "victim"), [("stalest-first", "B"), ("fifo", "A"), ("lru", "D")])
def test_eviction_policy_picks_its_victim(redis_server: PrivateRedis, policy: str, victim: str) -> None:
    config, _ = _run_with_budget(redis_server.url, policy, unique_prefix(policy))
    with running_cache(config) as (_, client):
        client.publish_version(1)
        fill(client, VERSIONS)
        assert client.stats_snapshot().dropped == {}
        (e,) = client.claim_rollouts("t0", 1)
        assert client.put_scores([make_scores(e)]).accepted == 1
        stats = client.stats_snapshot()
        assert stats.dropped == {"evicted": 1} and stats.evictions == {policy: 1}
        assert stats.bytes_held <= stats.byte_budget
        batch = client.pull_batch(4, 1)
        assert batch is not None
        kept = {s.rollout.sample_id for s in batch.samples}
        assert kept == {f"s{n}" for n in "ABCDE"} - {f"s{victim}"}
        client.ack_batch(batch.batch_id)
        stats = client.stats_snapshot()
        assert stats.invariant_holds() and (stats.produced, stats.trained, stats.in_flight) == (5, 4, 0)


def test_stalest_first_drops_unusable_samples_as_stale(redis_server: PrivateRedis) -> None:
    config, _ = _run_with_budget(redis_server.url, "stalest-first", unique_prefix("unusable"))
    with running_cache(config) as (_, client):
        client.publish_version(1)
        fill(client, VERSIONS)
        client.publish_version(2)  # B (version 0) can no longer be used at max_staleness 1
        (e,) = client.claim_rollouts("t0", 1)
        client.put_scores([make_scores(e)])
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 1} and stats.evictions == {"stalest-first": 1}
        assert stats.invariant_holds()


def test_backpressure_refuses_until_the_learner_consumes(redis_server: PrivateRedis) -> None:
    config, _ = _run_with_budget(redis_server.url, "backpressure", unique_prefix("bp"))
    with running_cache(config) as (_, client):
        client.publish_version(1)
        fill(client, VERSIONS)
        (e,) = client.claim_rollouts("t0", 1)
        before = client.stats_snapshot()
        with pytest.raises(CacheFull, match="backpressure"):
            client.put_scores([make_scores(e)])
        after = client.stats_snapshot()
        assert (after.bytes_held, after.queue_depth, after.dropped) == (before.bytes_held, before.queue_depth, {})
        batch = client.pull_batch(2, 1)
        assert batch is not None
        client.ack_batch(batch.batch_id)
        assert client.put_scores([make_scores(e)]).accepted == 1
        stats = client.stats_snapshot()
        assert stats.evictions == {} and stats.dropped == {} and stats.invariant_holds()
        assert stats.bytes_held <= stats.byte_budget
