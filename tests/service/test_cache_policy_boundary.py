"""The staleness rules of asyncopd.cache.policy as the Lua scripts apply them, at the exact
boundary, against the machine's Redis: a sample exactly max_staleness versions behind is
accepted, stored, scored and served at every stage; one version further is dropped as stale.
Also: the cache reports the policy's window in Stats, and a bound computed for a version the
learner has since left is recomputed, not applied."""

from __future__ import annotations

import pytest
import redis
from asyncopd.cache.main import store_policy
from asyncopd.cache.store import ExperienceStore, PayloadRef, StoredRollout
from asyncopd.wire.payload import payload_key
from test_cache_harness import (
    SHARED_REDIS,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    unique_prefix,
    wipe,
)

pytestmark = pytest.mark.service


def test_stats_report_the_window_admission_enforces() -> None:
    config = make_config(unique_prefix("window"), max_staleness=2, **{"learner.batch_size": 3})
    with running_cache(config) as (_, client):
        assert client.stats_snapshot().staleness_window == 9  # (2 + 1) * 3
        assert client.stats()["staleness_window"] == 9
        assert len(client.acquire_prompts("r0", 100)[0]) == 9


def test_every_stage_accepts_exactly_the_bound_and_drops_one_past_it() -> None:
    """eta = 2. Put at v5: ov 3 kept, ov 2 stale. Claim at v6: ov 4 handed out, ov 3 stale.
    Scores at v7: ov 5 kept, ov 4 stale. Pull at v7 serves staleness 2; pull at v8 drops ov 5."""
    config = make_config(unique_prefix("bound"), max_staleness=2, **{"learner.batch_size": 4})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 5)
        assert len(prompts) == 5
        client.publish_version(5)
        oldest = [2, 3, 4, 5, 5]
        rollouts = [make_rollout(p, ov, seed=i) for i, (p, ov) in enumerate(zip(prompts, oldest, strict=True))]
        client.put_rollouts(rollouts)
        stats = client.stats_snapshot()
        assert (stats.produced, stats.dropped) == (5, {"stale": 1})  # ov 2 < 5 - 2

        client.publish_version(6)
        claimed = client.claim_rollouts("t0", 5)
        assert sorted(r.sample_id for r in claimed) == sorted(r.sample_id for r in rollouts[2:])
        assert client.stats_snapshot().dropped == {"stale": 2}  # ov 3 < 6 - 2, dropped unscored

        client.publish_version(7)
        put = client.put_scores([make_scores(r) for r in claimed])
        assert put.accepted == 2
        assert client.stats_snapshot().dropped == {"stale": 3}  # ov 4 < 7 - 2, scores come too late

        batch = client.pull_batch(1, 7)
        assert batch is not None and batch.staleness == [2]  # exactly the bound: served
        client.ack_batch(batch.batch_id)
        assert client.pull_batch(1, 8) is None  # the other ov 5 sample is now one past the bound
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 4} and stats.staleness_served == {2: 1}
        assert stats.invariant_holds(), stats


def test_a_bound_computed_for_an_old_version_is_recomputed() -> None:
    """Two cache processes on one Redis: one publishes v5 while the other still believes v0.
    The second's put must judge staleness at v5 (the script refuses the old bound; it reruns)."""
    prefix = unique_prefix("rerun")
    config = make_config(prefix, max_staleness=2)
    a_client, b_client = redis.Redis.from_url(SHARED_REDIS), redis.Redis.from_url(SHARED_REDIS)
    try:
        a = ExperienceStore(a_client, prefix, store_policy(config))
        b = ExperienceStore(b_client, prefix, store_policy(config))
        tickets = a.acquire("r0", 2).tickets
        assert len(tickets) == 2
        b.publish_version(5)
        refs = [PayloadRef(payload_key(prefix, "r", f"s{i}", "00000000"), 8, 0) for i in range(2)]
        for ref in refs:  # the frames a producer wrote before sending the metadata
            a_client.set(ref.key, b"x" * 8)
        rollouts = [StoredRollout(f"s{i}", tickets[i].ticket, ov, 4, 0, refs[i]) for i, ov in enumerate([2, 3])]
        out = a.put_rollouts(rollouts)
        assert (out.accepted, out.stale) == (2, 1)  # ov 2 < 5 - 2 is stale; ov 3 is kept
        assert a.stats().queue_depth["unscored"] == 1
    finally:
        a_client.close()
        b_client.close()
        wipe(SHARED_REDIS, prefix)
