"""Cache claims at their edges, each checked deterministically through the real cache service
(gRPC on loopback, Redis behind it), each written so that the off-by-one or wiring bug it is
named after fails it:

- a rollout's staleness is its *oldest* token's version (tokens of one rollout may span
  versions when weights change mid-generation), at put time and when served;
- the put-time stale boundary: exactly at the bound is stored, one version past it is refused
  at put (not left for the later checks at claim or pull time to catch);
- the pull-time stale boundary: one version past the bound is dropped, exactly at it is served;
- the byte budget is a hard cap when nothing can be evicted (unscored and claimed samples
  stay), under every evicting policy; claimed samples are never evicted;
- `cache.order: newest-first` serves the freshest scored samples first.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from asyncopd.records import Prompt, Rollout
from asyncopd.wire.cache_client import CacheClient, CacheFull
from test_cache_eviction import stored_bytes
from test_cache_harness import make_config, make_rollout, make_scores, running_cache, unique_prefix

pytestmark = pytest.mark.service

MIB = float(1 << 20)


def put_and_score(client: CacheClient, rollouts: Sequence[Rollout]) -> None:
    """Put `rollouts`, then score every one of them (claimed by one teacher, in one go)."""
    client.put_rollouts(rollouts)
    claimed = client.claim_rollouts("t0", len(rollouts))
    assert sorted(r.sample_id for r in claimed) == sorted(r.sample_id for r in rollouts)
    assert client.put_scores([make_scores(r) for r in claimed]).accepted == len(rollouts)


def rollouts_for(prompts: Sequence[Prompt], versions: dict[str, int | list[int]]) -> dict[str, Rollout]:
    """One rollout per name in `versions` (name -> per-token versions or one version for all)."""
    return {
        name: make_rollout(p, v, num_tokens=4, sample_id=f"s{name}", seed=i)
        for i, ((name, v), p) in enumerate(zip(versions.items(), prompts, strict=False))
    }


# -- staleness is the oldest token's version ------------------------------------------------------


def test_staleness_is_the_oldest_tokens_version_at_put_and_when_served() -> None:
    """At version 2 with bound 1: tokens [1, 2, 2] and [2, 1, 2] are one version stale (not 0,
    as their newest token would say); [0, 2, 2] is beyond the bound and refused at put, though
    its newest token is current."""
    config = make_config(unique_prefix("oldest"), max_staleness=1, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        assert len(prompts) == 4
        client.publish_version(2)
        rs = rollouts_for(prompts, {"A": [1, 2, 2, 2], "B": [0, 2, 2, 2], "C": [2, 2, 1, 2], "D": [2, 2, 2, 2]})
        client.put_rollouts(list(rs.values()))
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 1}, "tokens [0, 2, 2, 2] at version 2 are beyond bound 1"
        assert (stats.produced, stats.queue_depth["unscored"]) == (4, 3)
        claimed = client.claim_rollouts("t0", 4)
        assert sorted(r.sample_id for r in claimed) == ["sA", "sC", "sD"]
        client.put_scores([make_scores(r) for r in claimed])
        batch = client.pull_batch(2, 2)  # oldest-first: the two one-version-old samples
        assert batch is not None
        assert sorted(s.rollout.sample_id for s in batch.samples) == ["sA", "sC"]
        assert batch.staleness == [1, 1]
        client.ack_batch(batch.batch_id)
        last = client.pull_batch(1, 2)
        assert last is not None and last.staleness == [0]
        client.ack_batch(last.batch_id)
        stats = client.stats_snapshot()
        assert stats.staleness_served == {1: 2, 0: 1}
        assert stats.invariant_holds() and stats.in_flight == 0


# -- the stale boundary at put and at pull ---------------------------------------------------------


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_put_refuses_one_version_past_the_bound_and_stores_exactly_at_it(eta: int) -> None:
    version = eta + 2
    config = make_config(unique_prefix(f"putb{eta}"), max_staleness=eta, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        assert len(prompts) == 2
        client.publish_version(version)
        at_bound = make_rollout(prompts[0], version - eta, sample_id="at-bound")
        past = make_rollout(prompts[1], version - eta - 1, sample_id="past-bound", seed=1)
        client.put_rollouts([at_bound, past])
        # Checked right after the put: the claim-time and pull-time checks must not be what
        # catches the one past the bound.
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 1}, stats.dropped
        assert stats.queue_depth["unscored"] == 1 and stats.produced == 2
        (claimed,) = client.claim_rollouts("t0", 2)
        assert claimed.sample_id == "at-bound"
        client.put_scores([make_scores(claimed)])
        batch = client.pull_batch(1, version)
        assert batch is not None and batch.staleness == [eta]
        assert client.ack_batch(batch.batch_id) == 1
        stats = client.stats_snapshot()
        assert (stats.trained, stats.dropped, stats.in_flight) == (1, {"stale": 1}, 0)
        assert stats.invariant_holds()


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_pull_drops_one_version_past_the_bound_and_serves_exactly_at_it(eta: int) -> None:
    """Scored at versions 0 and 1 while version 0 is published; pulling at 1 + eta makes the
    first one version past the bound and the second exactly at it."""
    config = make_config(unique_prefix(f"pullb{eta}"), max_staleness=eta, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        assert len(prompts) == 2
        older = make_rollout(prompts[0], 0, sample_id="older")
        newer = make_rollout(prompts[1], 1, sample_id="newer", seed=1)  # a replica one version ahead
        put_and_score(client, [older, newer])
        stats = client.stats_snapshot()
        assert stats.queue_depth["scored"] == 2 and stats.dropped == {}
        batch = client.pull_batch(1, 1 + eta)  # pulling at 1 + eta publishes it
        assert batch is not None
        assert [s.rollout.sample_id for s in batch.samples] == ["newer"]
        assert batch.staleness == [eta]
        assert client.stats_snapshot().dropped == {"stale": 1}
        assert client.pull_batch(1, 1 + eta, wait_ms=50) is None
        client.ack_batch(batch.batch_id)
        stats = client.stats_snapshot()
        assert stats.staleness_served == {eta: 1}
        assert stats.invariant_holds() and stats.in_flight == 0


# -- the byte budget is a hard cap -----------------------------------------------------------------


def _sizes(rs: dict[str, Rollout]) -> tuple[dict[str, int], dict[str, int]]:
    """(stored bytes of each rollout alone, of each rollout with its scores)."""
    alone = {n: stored_bytes(r) for n, r in rs.items()}
    full = {n: stored_bytes(r, make_scores(r)) for n, r in rs.items()}
    return alone, full


def _probe(versions: dict[str, int | list[int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Exact stored sizes of the records a test will send (same prompts, same seeds)."""
    config = make_config(unique_prefix("probe"), max_staleness=1, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", len(versions))
    # tickets differ per run only in the run id, which has a fixed length
    return _sizes(rollouts_for(prompts, versions))


EVICTING = ["lru", "fifo", "stalest-first"]


@pytest.mark.parametrize("policy", EVICTING)
def test_budget_is_a_hard_cap_when_only_unscored_samples_are_held(policy: str) -> None:
    versions: dict[str, int | list[int]] = {"A": 0, "B": 0, "C": 0}
    alone, _ = _probe(versions)
    budget = alone["A"] + alone["B"] + alone["C"] - 1
    config = make_config(
        unique_prefix(f"capu-{policy}"),
        max_staleness=1,
        **{"learner.batch_size": 2, "cache.eviction": policy, "cache.byte_budget_mb": budget / MIB},
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 3)
        rs = rollouts_for(prompts, versions)
        client.put_rollouts([rs["A"], rs["B"]])
        before = client.stats_snapshot()
        assert before.bytes_held == alone["A"] + alone["B"]
        with pytest.raises(CacheFull):
            client.put_rollouts([rs["C"]])
        after = client.stats_snapshot()
        assert after.bytes_held == before.bytes_held <= after.byte_budget
        assert (after.produced, after.dropped, after.evictions) == (2, {}, {})
        assert after.queue_depth["unscored"] == 2


@pytest.mark.parametrize("policy", EVICTING)
def test_budget_is_a_hard_cap_when_only_claimed_samples_are_held(policy: str) -> None:
    versions: dict[str, int | list[int]] = {"A": 0, "B": 0, "C": 0}
    alone, full = _probe(versions)
    budget = full["A"] + full["B"] + alone["C"] - 1
    config = make_config(
        unique_prefix(f"capc-{policy}"),
        max_staleness=1,
        **{"learner.batch_size": 2, "cache.eviction": policy, "cache.byte_budget_mb": budget / MIB},
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 3)
        rs = rollouts_for(prompts, versions)
        put_and_score(client, [rs["A"], rs["B"]])
        batch = client.pull_batch(2, 0)
        assert batch is not None
        before = client.stats_snapshot()
        assert before.queue_depth["claimed"] == 2 and before.bytes_held == full["A"] + full["B"]
        with pytest.raises(CacheFull):
            client.put_rollouts([rs["C"]])
        after = client.stats_snapshot()
        assert after.bytes_held == before.bytes_held <= after.byte_budget
        assert (after.dropped, after.evictions) == ({}, {})
        assert client.ack_batch(batch.batch_id) == 2, "a claimed sample was evicted"
        assert client.put_rollouts([rs["C"]]).accepted == 1, "acked samples free their bytes"


@pytest.mark.parametrize("policy", EVICTING)
def test_a_put_needing_room_evicts_the_unclaimed_sample_never_a_claimed_one(policy: str) -> None:
    """A and B claimed by the learner (put and scored first: the oldest, least recently used
    and stalest), C scored and unclaimed: a put needing room evicts C and only C."""
    versions: dict[str, int | list[int]] = {"A": 0, "B": 0, "C": 1, "D": 1}
    alone, full = _probe(versions)
    budget = full["A"] + full["B"] + full["C"] + alone["D"] - 1  # D fits once C is evicted
    config = make_config(
        unique_prefix(f"evc-{policy}"),
        max_staleness=1,
        **{"learner.batch_size": 2, "cache.eviction": policy, "cache.byte_budget_mb": budget / MIB},
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        assert len(prompts) == 4
        rs = rollouts_for(prompts, versions)
        put_and_score(client, [rs["A"], rs["B"]])
        batch = client.pull_batch(2, 0)
        assert batch is not None and sorted(s.rollout.sample_id for s in batch.samples) == ["sA", "sB"]
        client.publish_version(1)
        put_and_score(client, [rs["C"]])
        assert client.put_rollouts([rs["D"]]).accepted == 1
        stats = client.stats_snapshot()
        assert stats.dropped == {"evicted": 1} and stats.evictions == {policy: 1}
        assert stats.queue_depth["claimed"] == 2 and stats.queue_depth["scored"] == 0
        assert stats.bytes_held <= stats.byte_budget
        assert client.ack_batch(batch.batch_id) == 2, "a claimed sample was evicted"
        stats = client.stats_snapshot()
        assert stats.trained == 2 and stats.invariant_holds()


# -- batch order ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("order", "served"), [("newest-first", ["sC", "sB"]), ("oldest-first", ["sA", "sB"])])
def test_batch_order(order: str, served: list[str]) -> None:
    """A scored at version 0, B and C at version 1 (put in that order): newest-first serves C
    then B (newest version, latest put first); oldest-first A then B."""
    config = make_config(
        unique_prefix(f"order-{order}"), max_staleness=1, **{"learner.batch_size": 2, "cache.order": order}
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 3)
        assert len(prompts) == 3
        rs = rollouts_for(prompts, {"A": 0, "B": 1, "C": 1})
        put_and_score(client, [rs["A"]])
        client.publish_version(1)
        put_and_score(client, [rs["B"]])
        put_and_score(client, [rs["C"]])
        batch = client.pull_batch(2, 1)
        assert batch is not None
        assert [s.rollout.sample_id for s in batch.samples] == served
        assert batch.staleness == [1 if sid == "sA" else 0 for sid in served]
