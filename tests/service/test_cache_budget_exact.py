"""The byte budget at equality, in the cache's Lua: a put that brings the held bytes to exactly
the budget is stored (even under backpressure, which never evicts), and eviction stops as soon
as the victims free exactly what the put needs. Found by `make mutate`: `need <= 0` -> `< 0`
and `freed >= need` -> `>` survived the claims and eviction tests, whose budgets sit one byte
off the sizes.
"""

from __future__ import annotations

import pytest
from asyncopd.records import Prompt, Rollout
from test_cache_claims import MIB, put_and_score
from test_cache_eviction import stored_bytes
from test_cache_harness import make_config, make_rollout, make_scores, running_cache, unique_prefix

pytestmark = pytest.mark.service


def rollouts(prompts: list[Prompt], big_c: bool) -> dict[str, Rollout]:
    """A and B of 4 tokens; C of 4, or of 64 tokens (larger than A with its scores) when `big_c`."""
    return {
        name: make_rollout(p, 0, num_tokens=64 if big_c and name == "C" else 4, sample_id=f"s{name}", seed=i)
        for i, (name, p) in enumerate(zip("ABC", prompts, strict=False))
    }


def probe(big_c: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(stored bytes alone, with scores) of the rollouts a test will send (tickets differ per
    run only in the run id, which has a fixed length)."""
    config = make_config(unique_prefix("exprobe"), max_staleness=1, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 3)
    rs = rollouts(list(prompts), big_c)
    return {n: stored_bytes(r) for n, r in rs.items()}, {n: stored_bytes(r, make_scores(r)) for n, r in rs.items()}


def test_a_put_filling_the_budget_exactly_is_stored_under_backpressure() -> None:
    alone, _ = probe(big_c=False)
    budget = alone["A"] + alone["B"]
    config = make_config(
        unique_prefix("exbp"),
        max_staleness=1,
        **{"learner.batch_size": 2, "cache.eviction": "backpressure", "cache.byte_budget_mb": budget / MIB},
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 2)
        rs = rollouts(list(prompts), big_c=False)
        assert client.put_rollouts([rs["A"]]).accepted == 1
        assert client.put_rollouts([rs["B"]]).accepted == 1, "exactly at the budget is within it"
        stats = client.stats_snapshot()
        assert stats.bytes_held == stats.byte_budget == budget


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_eviction_stops_once_exactly_enough_is_freed(policy: str) -> None:
    """A and B scored (A first: the least recently used and the oldest); C needs exactly A's
    bytes: A alone is evicted, B stays."""
    alone, full = probe(big_c=True)
    assert alone["C"] > full["A"]
    held = full["A"] + full["B"]
    budget = held + alone["C"] - full["A"]
    config = make_config(
        unique_prefix(f"exev-{policy}"),
        max_staleness=1,
        **{"learner.batch_size": 2, "cache.eviction": policy, "cache.byte_budget_mb": budget / MIB},
    )
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 3)
        rs = rollouts(list(prompts), big_c=True)
        put_and_score(client, [rs["A"]])
        put_and_score(client, [rs["B"]])
        assert client.stats_snapshot().bytes_held == held
        assert client.put_rollouts([rs["C"]]).accepted == 1
        stats = client.stats_snapshot()
        assert stats.evictions == {policy: 1} and stats.dropped == {"evicted": 1}
        assert stats.queue_depth["scored"] == 1 and stats.bytes_held == budget
        batch = client.pull_batch(1, 0)
        assert batch is not None and [s.rollout.sample_id for s in batch.samples] == ["sB"]
