"""Waiting requests block on wake-ups instead of polling every 10 ms.

- with a fallback poll of 5 s, a waiting PullBatch returns as soon as another client's scores
  complete the batch, and a waiting AcquirePrompts as soon as an ack frees admission slots
  (only a wake-up can explain a return well before 5 s);
- an idle waiting request runs its script once or twice per wait, not once per fallback poll:
  twenty idle waiters cost about one script run each, and what only time changes (an expired
  prompt lease, teacher claim or batch claim) still wakes its waiters, from the one shared
  deadline check per cache process.
"""

from __future__ import annotations

import time
from typing import Any

from asyncopd.cache.main import RunningCache
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import in_thread, make_config, make_rollout, make_scores, running_cache, unique_prefix


def _count_calls(cache: RunningCache, name: str) -> list[int]:
    """Count the runs of script `name` (at the store's script runner, which every script goes through)."""
    calls = [0]
    store: Any = cache.store
    run = store._script

    def counted(script: str, args: Any) -> Any:
        calls[0] += script == name
        return run(script, args)

    store._script = counted
    return calls


def test_waits_end_on_wake_ups_not_on_polls() -> None:
    config = make_config(
        unique_prefix("wake"), max_staleness=0, **{"learner.batch_size": 2, "cache.poll_interval_ms": 5000.0}
    )
    with running_cache(config) as (cache, client):
        other = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        assert len(prompts) == 2  # the window (eta + 1) * B = 2 is now full
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        claimed = client.claim_rollouts("t0", 2, wait_ms=1000)
        pull, pulled = in_thread(lambda: client.pull_batch(2, 0, wait_ms=4000))
        time.sleep(0.3)  # the pull is waiting now
        other.put_scores([make_scores(r) for r in claimed])
        pull.join(timeout=10)
        assert pulled["value"] is not None and pulled["seconds"] < 2.0, pulled
        acquire, acquired = in_thread(lambda: other.acquire_prompts("r1", 1, wait_ms=4000))
        time.sleep(0.3)  # admission is full until the batch is acked and v1 published
        client.ack_batch(pulled["value"].batch_id)
        client.publish_version(1)
        acquire.join(timeout=10)
        assert len(acquired["value"][0]) == 1 and acquired["seconds"] < 2.0, acquired
        assert client.stats_snapshot().invariant_holds()


def test_an_idle_waiting_request_barely_touches_redis() -> None:
    config = make_config(unique_prefix("idle"), max_staleness=0, **{"learner.batch_size": 1})
    with running_cache(config) as (cache, client):
        assert len(client.acquire_prompts("r0", 1)[0]) == 1  # the window is full
        calls = _count_calls(cache, "acquire")
        t0 = time.monotonic()
        prompts, _, _ = client.acquire_prompts("r1", 1, wait_ms=1000)
        assert prompts == [] and time.monotonic() - t0 >= 0.9
        # on arrival, and once more when the listener first subscribes (a wake-up may have been
        # missed before): a timer per waiter re-ran it every 250 ms (~5), polling every 10 ms ~100
        assert 1 <= calls[0] <= 2, calls
        calls[0] = 0
        waiters = [in_thread(lambda i=i: client.acquire_prompts(f"w{i}", 1, wait_ms=1500)) for i in range(20)]
        for th, _ in waiters:
            th.join(timeout=10)
        assert all(out["value"][0] == [] and out["seconds"] >= 1.4 for _, out in waiters)
        # one run each on arrival; nothing freed a slot, so no wake-up and no run at the end
        assert 20 <= calls[0] <= 24, calls


def test_what_only_time_changes_still_wakes_the_waiters() -> None:
    """No script publishes when a lease runs out: the listener's shared deadline check does."""
    config = make_config(
        unique_prefix("due"),
        max_staleness=0,
        **{"learner.batch_size": 2, "cache.prompt_lease_s": 1.0, "cache.teacher_lease_s": 1.0},
    )
    with running_cache(config) as (cache, client):
        other = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)  # the window; r0 then goes silent
        assert len(prompts) == 2
        acquire, acquired = in_thread(lambda: other.acquire_prompts("r1", 2, wait_ms=5000))
        acquire.join(timeout=10)
        # the leases ran out after 1 s and the waiter got their positions again
        assert len(acquired["value"][0]) == 2 and 0.8 <= acquired["seconds"] < 3.0, acquired
        other.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(acquired["value"][0])])
        assert len(client.claim_rollouts("t0", 2, wait_ms=1000)) == 2  # t0 then dies holding them
        claim, claimed = in_thread(lambda: other.claim_rollouts("t1", 2, wait_ms=5000))
        claim.join(timeout=10)
        assert len(claimed["value"]) == 2 and 0.8 <= claimed["seconds"] < 3.0, claimed


def test_a_waiting_teacher_is_woken_by_a_put() -> None:
    config = make_config(unique_prefix("wake-t"), **{"cache.poll_interval_ms": 5000.0})
    with running_cache(config) as (cache, client):
        other = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        claim, claimed = in_thread(lambda: client.claim_rollouts("t0", 2, wait_ms=4000))
        time.sleep(0.3)  # the claim is waiting on an empty queue now
        other.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        claim.join(timeout=10)
        # only the 'rollouts' wake-up explains a return well before the 5 s fallback poll
        assert len(claimed["value"]) >= 1 and claimed["seconds"] < 2.0, claimed
