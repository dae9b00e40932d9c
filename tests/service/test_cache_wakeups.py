"""Waiting requests block on wake-ups instead of polling every 10 ms.

- with a fallback poll of 5 s, a waiting PullBatch returns as soon as another client's scores
  complete the batch, and a waiting AcquirePrompts as soon as an ack frees admission slots
  (only a wake-up can explain a return well before 5 s);
- an idle waiting request runs its script once or twice per wait, not once per fallback poll:
  twenty idle waiters cost about one script run each, and what only time changes (an expired
  prompt lease, teacher claim or batch claim) still wakes its waiters, from the one shared
  deadline check per cache process;
- a client that stops waiting (`CacheClient.stop_waiting`, a service told to stop) cuts its
  call at once, and the cache ends that server-side wait without taking anything for it;
- new work wakes one waiter, who relays the wake-up when it found some: as many waiters run
  their scripts as the work has room for, plus one, not every waiter;
- on a sharded cache a waiting request is woken by whichever shard gets work;
- waits hold the cache's worker threads: beyond `waiting_limit(workers)` they are answered at
  once, so puts never queue behind long polls.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from asyncopd.cache.main import RunningCache
from asyncopd.cache.waits import waiting_limit
from asyncopd.wire import payload
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.convert import Limits
from asyncopd.wire.payload_store import PayloadStore
from asyncopd.wire.rpc import channel
from test_cache_harness import (
    SHARED_REDIS,
    VOCAB,
    in_thread,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    unique_prefix,
)


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


def test_new_work_wakes_as_many_waiters_as_it_has_room_for_plus_one_not_all() -> None:
    """Eight teachers wait on an empty queue; a put of two rollouts wakes one, who claims one and
    relays the wake-up, the next claims the other and relays, the third finds nothing and ends
    the relay: three claim runs, not eight (every waiter woken, six for nothing). (The six left
    run theirs once more when their waits end: a wake-up came during them.)"""
    config = make_config(unique_prefix("relay"), **{"cache.poll_interval_ms": 5000.0})
    with running_cache(config) as (cache, client):
        other = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        waiters = [in_thread(lambda i=i: client.claim_rollouts(f"t{i}", 1, wait_ms=6000)) for i in range(8)]
        deadline = time.monotonic() + 10
        while _waiting(cache) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting(cache) == 8
        calls = _count_calls(cache, "claim")
        other.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        while sum("value" in out for _, out in waiters) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # every waiter a put wakes has run its script by now
        woken_runs = calls[0]
        for th, _ in waiters:
            th.join(timeout=15)
        got = sorted((len(out["value"]), out["seconds"]) for _, out in waiters)
        assert [n for n, _ in got] == [0] * 6 + [1, 1], got
        assert all(seconds < 2.0 for n, seconds in got if n), got  # woken, not timed out
        assert woken_runs <= 4, woken_runs


def _train_one(client: CacheClient, prompt: Any) -> None:
    """Answer, score, pull, ack `prompt` and publish version 1: its admission slot is free again."""
    client.put_rollouts([make_rollout(prompt, 0)])
    client.put_scores([make_scores(r) for r in client.claim_rollouts("t0", 1)])
    batch = client.pull_batch(1, 0)
    assert batch is not None
    client.ack_batch(batch.batch_id)
    client.publish_version(1)


def _waiting(cache: RunningCache) -> int:
    """How many requests sleep on the store's wake-ups now."""
    store: Any = cache.store
    return store.wakeups.sleeping


def test_a_client_that_stops_waiting_frees_the_server_wait_and_takes_nothing() -> None:
    # A long wait keeps an idle fleet cheap; stopping must not wait it out, and the prompt that
    # the abandoned wait would have taken must go to a live replica, not to the gone one.
    config = make_config(
        unique_prefix("gone"), max_staleness=0, **{"learner.batch_size": 1, "cache.poll_interval_ms": 5000.0}
    )
    with running_cache(config) as (cache, client):
        leaving = CacheClient(channel(cache.address), timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 1)
        assert len(prompts) == 1  # the window (eta + 1) * B = 1 is full
        acquire, acquired = in_thread(lambda: leaving.acquire_prompts("r-leaving", 1, wait_ms=20000))
        deadline = time.monotonic() + 5
        while _waiting(cache) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting(cache) == 1, "the request waits at the cache"
        t0 = time.monotonic()
        leaving.stop_waiting()
        acquire.join(timeout=5)
        assert acquired["value"] == ([], 0, False) and time.monotonic() - t0 < 1.0, acquired
        while _waiting(cache) and time.monotonic() - t0 < 2.0:
            time.sleep(0.02)
        assert _waiting(cache) == 0, "the server-side wait ended with its caller"
        # a later waiting call of a stopped client returns at once too
        t1 = time.monotonic()
        assert leaving.claim_rollouts("t-leaving", 1, wait_ms=20000) == []
        assert time.monotonic() - t1 < 1.0
        # free the slot: the next replica gets the prompt, the gone one took nothing
        _train_one(client, prompts[0])
        time.sleep(0.3)  # a wait that ignored its gone caller would wake now and take the slot
        got, _, _ = client.acquire_prompts("r1", 1)
        assert len(got) == 1, "the freed slot went to the live replica"
        stats = client.stats_snapshot()
        assert stats.admitted == 2 and stats.invariant_holds(), stats


def test_a_sharded_wait_is_woken_by_whichever_shard_gets_work() -> None:
    # A waiting request sleeps on every shard's wake-ups: before, it waited on one shard (the
    # next in rotation) and slept through work arriving at the other until its wait ran out.
    prefix = unique_prefix("shard-wake")
    values = {"learner.batch_size": 2, "cache.shards": 2, "cache.poll_interval_ms": 5000.0}
    config = make_config(prefix, max_staleness=1, **values)
    with running_cache(config) as (cache, _):
        frames = PayloadStore(redis.Redis.from_url(SHARED_REDIS), prefix, ttl_s=60.0)
        client = CacheClient(channel(cache.address), Limits(vocab_size=VOCAB), payloads=frames)
        try:
            client.begin_learner()
            prompts, _, _ = client.acquire_prompts("r0", 4)
            on_shard0 = [p for p in prompts if payload.ticket_shard(p.ticket) == 0]
            assert len(on_shard0) == 2
            for i, p in enumerate(on_shard0):  # two rounds: the rotation starts at a different shard each
                claim, claimed = in_thread(lambda: client.claim_rollouts("t0", 1, wait_ms=4000))
                time.sleep(0.3)  # the claim waits on empty queues now
                client.put_rollouts([make_rollout(p, 0, seed=i)])
                claim.join(timeout=10)
                # only a wake-up from shard 0 explains a return well before the 4 s wait
                assert len(claimed["value"]) == 1 and claimed["seconds"] < 2.0, (i, claimed)
            assert client.stats_snapshot().invariant_holds()
        finally:
            frames.close()


def test_waits_beyond_the_workers_reserve_are_answered_at_once_so_puts_still_get_through() -> None:
    # Each waiting request holds one of the cache's gRPC worker threads. With as many waiting
    # callers as workers, a put used to queue behind the waits until one ended; now the waits
    # beyond the limit are answered at once (counted) and a reserve of threads stays free.
    workers = 8
    config = make_config(
        unique_prefix("cut"), max_staleness=0, **{"learner.batch_size": 1, "cache.server.workers": workers}
    )
    with running_cache(config) as (cache, client):
        limit = waiting_limit(workers)
        assert cache.servicer.waits.limit == limit < workers
        prompts, _, _ = client.acquire_prompts("r0", 1)  # the window is full: every acquire waits
        callers = [CacheClient(channel(cache.address), timeout_s=30.0) for _ in range(workers)]
        waiters = [
            in_thread(lambda c=c, i=i: c.acquire_prompts(f"w{i}", 1, wait_ms=6000)) for i, c in enumerate(callers)
        ]
        deadline = time.monotonic() + 5
        while sum(1 for _, out in waiters if "value" in out) < workers - limit and time.monotonic() < deadline:
            time.sleep(0.02)
        answered = [out for _, out in waiters if "value" in out]
        assert len(answered) == workers - limit and all(out["seconds"] < 2.0 for out in answered), answered
        assert cache.servicer.waits.cut == workers - limit and cache.servicer.waits.waiting == limit
        t0 = time.monotonic()
        assert client.put_rollouts([make_rollout(prompts[0], 0)]).accepted == 1
        assert time.monotonic() - t0 < 2.0, "a put waited for a thread held by a long poll"
        for c in callers:
            c.stop_waiting()
        for th, _ in waiters:
            th.join(timeout=10)
        deadline = time.monotonic() + 2
        while cache.servicer.waits.waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.servicer.waits.waiting == 0, "the cut-off callers' waits ended with them"
        assert client.stats_snapshot().invariant_holds()


def test_a_request_arriving_after_an_empty_run_sleeps_without_running_its_script() -> None:
    """The window is full and a run of the admission script found nothing; no wake-up came since.
    Replicas A, B and C arrive and go to sleep without running it (it would find nothing). C's
    caller goes away: it ends having run nothing, taking nothing. A slot is freed (an ack and a
    publish, two wake-ups): the relays take A and B through a few runs, one of them gets the
    slot, and neither runs again when its wait ends (each has run)."""
    config = make_config(
        unique_prefix("queued"), max_staleness=0, **{"learner.batch_size": 1, "cache.poll_interval_ms": 5000.0}
    )
    with running_cache(config) as (cache, client):
        prompts, _, _ = client.acquire_prompts("r0", 1)
        assert len(prompts) == 1  # the window (eta + 1) * B = 1 is full
        # its run finds nothing (and the listener subscribes, waking every waiter once: settled)
        assert client.acquire_prompts("r-first", 1, wait_ms=300)[0] == []
        calls = _count_calls(cache, "acquire")
        a, a_out = in_thread(lambda: client.acquire_prompts("rA", 1, wait_ms=4000))
        deadline = time.monotonic() + 5
        while _waiting(cache) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        b, b_out = in_thread(lambda: client.acquire_prompts("rB", 1, wait_ms=4000))
        leaving = CacheClient(channel(cache.address), timeout_s=30.0)
        c, c_out = in_thread(lambda: leaving.acquire_prompts("rC", 1, wait_ms=4000))
        while _waiting(cache) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting(cache) == 3 and calls[0] == 0, "A, B and C sleep without a run"
        leaving.stop_waiting()
        c.join(timeout=5)
        assert c_out["value"][0] == [] and calls[0] == 0, "C's caller went away: C ran nothing"
        _train_one(client, prompts[0])
        while not ("value" in a_out or "value" in b_out) and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        time.sleep(0.5)  # the relay has ended by now
        woken_runs = calls[0]
        assert 2 <= woken_runs <= 4, woken_runs
        a.join(timeout=10)
        b.join(timeout=10)
        got = sorted(len(out["value"][0]) for out in (a_out, b_out))
        assert got == [0, 1], (a_out, b_out)
        assert min(a_out["seconds"], b_out["seconds"]) < 3.5, "the slot went to a woken waiter, not a timed-out one"
        assert calls[0] == woken_runs, "no run at the end of a wait that had run"
        stats = client.stats_snapshot()
        assert stats.admitted == 2 and stats.invariant_holds(), stats
