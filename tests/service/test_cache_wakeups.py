"""Waiting requests block on wake-ups instead of polling every 10 ms.

- with a fallback poll of 5 s, a waiting PullBatch returns as soon as another client's scores
  complete the batch, and a waiting AcquirePrompts as soon as an ack frees admission slots
  (only a wake-up can explain a return well before 5 s);
- an idle waiting request runs its script a handful of times per second, not 100.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from asyncopd.cache.main import RunningCache
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import make_config, make_rollout, make_scores, running_cache, unique_prefix


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


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        out["value"] = fn()
        out["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


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
        pull, pulled = _in_thread(lambda: client.pull_batch(2, 0, wait_ms=4000))
        time.sleep(0.3)  # the pull is waiting now
        other.put_scores([make_scores(r) for r in claimed])
        pull.join(timeout=10)
        assert pulled["value"] is not None and pulled["seconds"] < 2.0, pulled
        acquire, acquired = _in_thread(lambda: other.acquire_prompts("r1", 1, wait_ms=4000))
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
        # the default fallback re-check is 250 ms: ~5 runs in a second (polling every 10 ms: ~100)
        assert 1 <= calls[0] <= 8, calls


def test_a_waiting_teacher_is_woken_by_a_put() -> None:
    config = make_config(unique_prefix("wake-t"), **{"cache.poll_interval_ms": 5000.0})
    with running_cache(config) as (cache, client):
        other = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        claim, claimed = _in_thread(lambda: client.claim_rollouts("t0", 2, wait_ms=4000))
        time.sleep(0.3)  # the claim is waiting on an empty queue now
        other.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        claim.join(timeout=10)
        # only the 'rollouts' wake-up explains a return well before the 5 s fallback poll
        assert len(claimed["value"]) >= 1 and claimed["seconds"] < 2.0, claimed
