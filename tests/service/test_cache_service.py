"""The cache service over gRPC against the machine's Redis: admission at staleness 0/1/4,
teacher and learner crashes, prompt re-issue, epochs, restarts of the service, and bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
from asyncopd.cache.main import start_cache
from asyncopd.records import SupportKind
from asyncopd.v1 import cache_pb2, cache_pb2_grpc
from asyncopd.wire import encode, rollout_to_proto, scores_to_proto
from asyncopd.wire.cache_client import CacheClient, CacheStats
from asyncopd.wire.rpc import channel
from test_cache_harness import (
    VOCAB,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    tiny_prompts,
    unique_prefix,
)

pytestmark = pytest.mark.service


def poll_until(get: Callable[[], Any], collect: int = 0, deadline_s: float = 30.0) -> Any:
    """What `get()` returns once it is truthy (a lease has run out), polled with a generous
    deadline instead of sleeping just past the lease. With `collect`, results (lists) are
    accumulated until there are that many (a lease may expire for some items a poll earlier)."""
    deadline = time.monotonic() + deadline_s
    got: list[Any] = []
    while True:
        value = get()
        if collect:
            got += value
            if len(got) >= collect:
                return got
        elif value:
            return value
        assert time.monotonic() < deadline, f"not met within {deadline_s} s (got {got!r})"
        time.sleep(0.02)


def assert_accounting(stats: CacheStats) -> None:
    assert stats.invariant_holds(), stats
    assert stats.in_flight == sum(stats.queue_depth[q] for q in ("unscored", "scoring", "scored", "claimed"))


def produce_and_score(client: CacheClient, replica: str, version: int, want: int) -> list[str]:
    """Acquire up to `want` prompts, generate with `version`, score them all; returns sample ids."""
    prompts, _, _ = client.acquire_prompts(replica, want)
    rollouts = [make_rollout(p, version, seed=i) for i, p in enumerate(prompts)]
    if rollouts:
        client.put_rollouts(rollouts)
        claimed = client.claim_rollouts("teacher-0", len(rollouts))
        assert len(claimed) == len(rollouts)
        client.put_scores([make_scores(r) for r in claimed])
    return [r.sample_id for r in rollouts]


def test_strict_sync_admits_one_batch_per_version() -> None:
    config = make_config(unique_prefix("sync"), max_staleness=0, **{"learner.batch_size": 4})
    with running_cache(config) as (_, client):
        for version in range(3):
            ids = produce_and_score(client, "r0", version, want=10)
            assert len(ids) == 4, f"version {version}: admission must hand out exactly one batch"
            assert client.acquire_prompts("r0", 10)[0] == []
            batch = client.pull_batch(4, version)
            assert batch is not None and batch.staleness == [0, 0, 0, 0]
            assert sorted(s.rollout.sample_id for s in batch.samples) == sorted(ids)
            assert client.acquire_prompts("r0", 10)[0] == [], "claimed is not consumed yet"
            assert client.ack_batch(batch.batch_id) == 4
            # Trained but the version has not moved: generating now would be one step stale.
            assert client.acquire_prompts("r0", 10)[0] == []
            client.publish_version(version + 1)
        stats = client.stats_snapshot()
        assert (stats.produced, stats.trained, stats.in_flight) == (12, 12, 0)
        assert stats.staleness_served == {0: 12}
        assert_accounting(stats)


def test_strict_sync_never_serves_a_partial_batch() -> None:
    config = make_config(unique_prefix("part"), max_staleness=0, **{"learner.batch_size": 4})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        rollouts = [make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]
        client.put_rollouts(rollouts)
        claimed = client.claim_rollouts("t", 4)
        client.put_scores([make_scores(r) for r in claimed[:3]])
        assert client.pull_batch(4, 0, wait_ms=50) is None
        client.put_scores([make_scores(claimed[3])])
        batch = client.pull_batch(4, 0, wait_ms=50)
        assert batch is not None and len(batch.samples) == 4


@pytest.mark.parametrize("eta", [1, 4])
def test_bounded_staleness_admission(eta: int) -> None:
    """AReaL capacity: (eta + 1) * B admitted up front, then one batch per version; served
    staleness reaches exactly eta (oldest-first) and never exceeds it."""
    b = 3
    config = make_config(unique_prefix(f"eta{eta}"), max_staleness=eta, **{"learner.batch_size": b})
    with running_cache(config) as (_, client):
        first = produce_and_score(client, "r0", 0, want=100)
        assert len(first) == (eta + 1) * b
        served: list[int] = []
        for version in range(eta + 4):
            batch = client.pull_batch(b, version)
            assert batch is not None
            served += batch.staleness
            client.ack_batch(batch.batch_id)
            assert client.acquire_prompts("r0", 100)[0] == []
            client.publish_version(version + 1)
            assert len(produce_and_score(client, "r0", version + 1, want=100)) == b
        assert max(served) == eta and min(served) == 0
        stats = client.stats_snapshot()
        assert sum(stats.staleness_served.values()) == len(served)
        assert stats.dropped == {}
        assert_accounting(stats)


def test_stale_rollout_is_dropped_not_served() -> None:
    """A replica that missed weight updates produces work beyond the bound: counted, never served."""
    config = make_config(unique_prefix("stale"), max_staleness=1, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        client.publish_version(3)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        stats = client.stats_snapshot()
        assert stats.produced == 4 and stats.dropped == {"stale": 4} and stats.in_flight == 0
        assert_accounting(stats)
        # their admission slots are free again
        assert len(client.acquire_prompts("r0", 4)[0]) == 4


def test_rollouts_gone_stale_in_the_queue_are_dropped_not_scored() -> None:
    config = make_config(unique_prefix("qstale"), max_staleness=1, **{"learner.batch_size": 2})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts[:2])])
        client.publish_version(1)
        client.put_rollouts([make_rollout(p, 1, seed=i) for i, p in enumerate(prompts[2:])])
        client.publish_version(2)  # version-0 work is now beyond the bound
        claimed = client.claim_rollouts("t0", 4)
        assert sorted(r.sample_id for r in claimed) == sorted(f"{p.ticket}/s" for p in prompts[2:])
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 2} and stats.queue_depth["scoring"] == 2
        assert_accounting(stats)


def test_teacher_crash_redelivers_after_lease() -> None:
    config = make_config(unique_prefix("tcrash"), **{"cache.teacher_lease_s": 1.0})
    with running_cache(config) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        dead = client.claim_rollouts("teacher-dead", 4)
        assert len(dead) == 4
        assert client.claim_rollouts("teacher-ok", 4, wait_ms=50) == []
        # polled, not slept past the lease: they come back once the lease has run out
        again = poll_until(lambda: client.claim_rollouts("teacher-ok", 4, wait_ms=50), collect=4)
        assert sorted(r.sample_id for r in again) == sorted(r.sample_id for r in dead)
        assert client.put_scores([make_scores(r) for r in again]).accepted == 4
        late = client.put_scores([make_scores(r, teacher="teacher-dead") for r in dead])
        assert (late.accepted, late.duplicates) == (0, 4)
        stats = client.stats_snapshot()
        assert stats.counters["redelivered"] == 4 and stats.queue_depth["scored"] == 4
        assert stats.queue_depth["scoring"] == 0 and stats.queue_depth["unscored"] == 0
        assert_accounting(stats)


def test_learner_crash_returns_claim_after_timeout() -> None:
    config = make_config(unique_prefix("lcrash"), **{"cache.batch_claim_s": 1.0})
    with running_cache(config) as (_, client):
        produce_and_score(client, "r0", 0, want=4)
        lost = client.pull_batch(4, 0)
        assert lost is not None
        assert client.pull_batch(4, 0, wait_ms=50) is None
        again = poll_until(lambda: client.pull_batch(4, 0, wait_ms=50))
        assert sorted(s.rollout.sample_id for s in again.samples) == sorted(s.rollout.sample_id for s in lost.samples)
        with pytest.raises(grpc.RpcError) as err:
            client.ack_batch(lost.batch_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert client.ack_batch(again.batch_id) == 4
        assert client.ack_batch(again.batch_id) == 4, "a retried ack is idempotent"
        stats = client.stats_snapshot()
        assert stats.trained == 4 and stats.counters["batches_returned"] == 1
        assert_accounting(stats)


def test_dead_replica_prompts_are_reissued_and_released_ones_too() -> None:
    config = make_config(unique_prefix("reissue"), max_staleness=0, **{"cache.prompt_lease_s": 1.0})
    with running_cache(config) as (_, client):
        mine, _, _ = client.acquire_prompts("r-dead", 4)
        assert len(mine) == 4 and client.acquire_prompts("r1", 4)[0] == []
        theirs = poll_until(lambda: client.acquire_prompts("r1", 4, wait_ms=50)[0], collect=4)
        assert [p.ticket for p in theirs] == [p.ticket for p in mine]
        assert client.release_prompts("r-other", [theirs[0].ticket]) == 0, "only the holder releases"
        assert client.release_prompts("r1", [p.ticket for p in theirs[:2]]) == 2
        back, _, _ = client.acquire_prompts("r2", 4)
        assert [p.prompt_id for p in back] == [p.prompt_id for p in theirs[:2]]
        # a late rollout from the dead replica closes the ticket; the re-issued copy is a duplicate
        assert client.put_rollouts([make_rollout(mine[2], 0, sample_id="late")]).accepted == 1
        assert client.put_rollouts([make_rollout(theirs[2], 0, sample_id="second")]).duplicates == 1
        stats = client.stats_snapshot()
        assert stats.produced == 1 and stats.admitted == 4 + 4 + 2
        assert_accounting(stats)


def test_epochs_hand_out_every_prompt_once_then_reshuffle() -> None:
    config = make_config(unique_prefix("epoch"), max_staleness=10, **{"learner.batch_size": 10})
    with running_cache(config, prompts=tiny_prompts(10)) as (_, client):
        first, _, _ = client.acquire_prompts("r0", 10)
        second, _, _ = client.acquire_prompts("r0", 10)
        assert sorted(p.prompt_id for p in first) == sorted(p.prompt_id for p in second)
        assert len({p.prompt_id for p in first}) == 10
        assert {p.epoch for p in first} == {0} and {p.epoch for p in second} == {1}
        assert [p.prompt_id for p in first] != [p.prompt_id for p in second]
        assert all(int(p.prompt_ids.max()) < VOCAB for p in first)


def test_finished_stops_admission() -> None:
    config = make_config(unique_prefix("fin"))
    with running_cache(config) as (_, client):
        client.publish_version(2, finished=True)
        prompts, version, finished = client.acquire_prompts("r0", 4)
        assert (prompts, version, finished) == ([], 2, True)
        with pytest.raises(grpc.RpcError) as err:
            client.publish_version(1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_service_restart_loses_nothing_redis_held() -> None:
    prefix = unique_prefix("svc")
    config = make_config(prefix, **{"learner.batch_size": 2, "max_staleness": 2})
    with running_cache(config, wipe_after=False) as (_, client):
        prompts, _, _ = client.acquire_prompts("r0", 6)
        rollouts = [make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]
        client.put_rollouts(rollouts[:4])
        claimed = client.claim_rollouts("t0", 2)
        client.put_scores([make_scores(r) for r in claimed])
        batch = client.pull_batch(2, 0)
        assert batch is not None
        before = client.stats_snapshot()
    with running_cache(config) as (_, client):
        after = client.stats_snapshot()
        assert (after.produced, after.in_flight, after.bytes_held, after.queue_depth) == (
            before.produced,
            before.in_flight,
            before.bytes_held,
            before.queue_depth,
        )
        assert client.ack_batch(batch.batch_id) == 2
        client.put_rollouts(rollouts[4:])  # tickets issued by the previous process still count
        rest = client.claim_rollouts("t1", 10)
        assert len(rest) == 4
        client.put_scores([make_scores(r) for r in rest])
        for _ in range(2):
            b = client.pull_batch(2, 0)
            assert b is not None
            client.ack_batch(b.batch_id)
        stats = client.stats_snapshot()
        assert (stats.produced, stats.trained, stats.in_flight) == (6, 6, 0)
        assert_accounting(stats)


def test_two_service_processes_share_one_redis() -> None:
    config = make_config(unique_prefix("two"), max_staleness=0, **{"learner.batch_size": 4})
    with running_cache(config) as (_, a):
        other = start_cache(config, "cache-b", prompts=tiny_prompts(), tokenize=lambda s: [1] * len(s),
                            vocab_size=VOCAB, serve_metrics=False)  # fmt: skip
        ch = channel(other.address)
        try:
            b = CacheClient(ch)
            got = a.acquire_prompts("r0", 3)[0] + b.acquire_prompts("r1", 3)[0]
            assert len(got) == 4 and len({p.ticket for p in got}) == 4
            b.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(got)])
            claimed = a.claim_rollouts("t0", 2) + b.claim_rollouts("t1", 4)
            assert len({r.sample_id for r in claimed}) == 4
            a.put_scores([make_scores(r) for r in claimed])
            batch = b.pull_batch(4, 0)
            assert batch is not None and a.ack_batch(batch.batch_id) == 4
            assert_accounting(a.stats_snapshot())
        finally:
            ch.close()
            other.stop(grace=0.5)


# -- bad input --------------------------------------------------------------------------------


def _raw(cache_address: str) -> cache_pb2_grpc.CacheServiceStub:
    return cache_pb2_grpc.CacheServiceStub(channel(cache_address))


def _expect_invalid(call: object, request: object, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details(), err.value.details()


def test_bad_rollouts_are_rejected_whole() -> None:
    # A tiny request limit, so that one long rollout exceeds it; the rollout batch the config
    # check sizes against that limit is made to fit (one 16-token rollout of top-8 support).
    config = make_config(
        unique_prefix("bad"),
        **{"cache.max_request_mb": 0.01, "rollout.batch_size": 1, "rollout.sampling.max_tokens": 16, "loss.k": 8},
    )
    with running_cache(config) as (cache, client):
        stub = _raw(cache.address)
        prompts, _, _ = client.acquire_prompts("r0", 4)
        good = rollout_to_proto(make_rollout(prompts[0], 0))

        def bad(**changes: object) -> cache_pb2.PutRolloutsRequest:
            msg = rollout_to_proto(replace(make_rollout(prompts[1], 0, sample_id="bad"), **changes))
            return cache_pb2.PutRolloutsRequest(rollouts=[good, msg])

        ids = np.array([1, 2, VOCAB], dtype=np.int32)
        short = bad(response_ids=ids, behavior_logprobs=-np.ones(3, np.float32), versions=np.zeros(3, np.int32))
        _expect_invalid(stub.PutRollouts, short, "rollouts[1].response_ids: token id 64 is outside")
        nan = -np.ones(6, np.float32)
        nan[2] = np.nan
        _expect_invalid(stub.PutRollouts, bad(behavior_logprobs=nan), "rollouts[1].behavior_logprobs: NaN")
        _expect_invalid(stub.PutRollouts, bad(versions=np.full(6, 2, np.int32)), "version 2 is from the future")
        _expect_invalid(stub.PutRollouts, bad(behavior_logprobs=-np.ones(5, np.float32)), "shape [5]")
        _expect_invalid(stub.PutRollouts, bad(ticket="nope"), "rollouts[1].ticket: unknown ticket 'nope'")
        _expect_invalid(stub.PutRollouts, bad(ticket=""), "rollouts[1].ticket: must not be empty")
        _expect_invalid(stub.PutRollouts, bad(sample_id=""), "rollouts[1].sample_id: must not be empty")
        dup = cache_pb2.PutRolloutsRequest(rollouts=[good, good])
        _expect_invalid(stub.PutRollouts, dup, "appears twice")
        big = make_rollout(prompts[1], 0, num_tokens=4000, sample_id="big")
        _expect_invalid(stub.PutRollouts, cache_pb2.PutRolloutsRequest(rollouts=[rollout_to_proto(big)]), "limit")
        _expect_invalid(stub.PutRollouts, cache_pb2.PutRolloutsRequest(), "rollouts: must be >= 1")
        stats = client.stats_snapshot()
        assert (stats.produced, stats.bytes_held, stats.queue_depth["unscored"]) == (0, 0, 0), "nothing stored"
        # one version ahead is fine: replicas get weights v + 1 before the learner publishes v + 1 here
        assert client.put_rollouts([make_rollout(prompts[0], 1)]).accepted == 1


def test_bad_scores_and_requests_are_rejected() -> None:
    config = make_config(unique_prefix("badsc"))
    with running_cache(config) as (cache, client):
        stub = _raw(cache.address)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        rollouts = [make_rollout(p, 0, support=SupportKind.STUDENT_TOPK, k=3, seed=i) for i, p in enumerate(prompts)]
        client.put_rollouts(rollouts)
        client.claim_rollouts("t0", 2)
        good = scores_to_proto(make_scores(rollouts[0]))

        def with_bad(msg: object) -> cache_pb2.PutScoresRequest:
            return cache_pb2.PutScoresRequest(scores=[good, msg])

        wrong_t = scores_to_proto(replace(make_scores(rollouts[1]), token_logprobs=-np.ones(2, np.float32)))
        _expect_invalid(stub.PutScores, with_bad(wrong_t), "scores[1].token_logprobs: shape [2]")
        no_support = scores_to_proto(replace(make_scores(rollouts[1]), support_logprobs=None))
        _expect_invalid(stub.PutScores, with_bad(no_support), "scores[1].support_logprobs: required")
        out_of_vocab = scores_to_proto(make_scores(rollouts[1]))
        out_of_vocab.topk_ids.CopyFrom(encode(np.full((6, 4), VOCAB + 5, np.int32)))
        _expect_invalid(stub.PutScores, with_bad(out_of_vocab), "scores[1].topk_ids: token id 69")
        positive = scores_to_proto(replace(make_scores(rollouts[1]), token_logprobs=np.ones(6, np.float32)))
        _expect_invalid(stub.PutScores, with_bad(positive), "is not a log-probability")
        assert client.stats_snapshot().queue_depth["scored"] == 0, "nothing stored"

        _expect_invalid(stub.AcquirePrompts, cache_pb2.AcquirePromptsRequest(replica="r", max_prompts=0), "max_prompts")
        _expect_invalid(stub.AcquirePrompts, cache_pb2.AcquirePromptsRequest(max_prompts=1), "replica: must not be")
        _expect_invalid(stub.ClaimRollouts, cache_pb2.ClaimRolloutsRequest(teacher="t", max_rollouts=-1), "max_roll")
        _expect_invalid(stub.PullBatch, cache_pb2.PullBatchRequest(size=0), "size: must be >= 1")
        _expect_invalid(stub.PullBatch, cache_pb2.PullBatchRequest(size=9), "can never be served")
        _expect_invalid(stub.PullBatch, cache_pb2.PullBatchRequest(size=1, learner_version=-1), "negative")
        _expect_invalid(stub.AckBatch, cache_pb2.AckBatchRequest(), "batch_id: must not be empty")
        _expect_invalid(stub.PublishVersion, cache_pb2.PublishVersionRequest(version=-2), "negative")
        assert_accounting(client.stats_snapshot())


def test_a_pull_is_one_script_whose_reply_carries_the_batch_metadata() -> None:
    """PullBatch reads nothing after its script: the samples' metadata (the learner's references)
    and the tickets the rollback journal keeps come from the script's own reply."""
    config = make_config(unique_prefix("pull-one"), **{"learner.batch_size": 4})
    with running_cache(config) as (cache, client):
        prompts, _, _ = client.acquire_prompts("r0", 4)
        client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)])
        client.put_scores([make_scores(r) for r in client.claim_rollouts("t0", 4)])
        store: Any = cache.store
        reads: list[str] = []
        pipeline, execute = store.redis.pipeline, store.redis.execute_command
        store.redis.pipeline = lambda *a, **k: (reads.append("pipeline"), pipeline(*a, **k))[1]
        store.redis.execute_command = lambda *a, **k: (reads.append(str(a[0])), execute(*a, **k))[1]
        try:
            out = store.pull_batch(4, 0, "learner")
        finally:
            store.redis.pipeline, store.redis.execute_command = pipeline, execute
        assert reads == ["EVALSHA"], reads
        assert out.batch is not None and len(out.batch.samples) == 4
        by_ticket = {p.ticket: p for p in prompts}
        for m in out.batch.samples:
            assert m.ticket in by_ticket and m.num_tokens == 6 and m.rollout.nbytes > 0
            assert m.scores is not None and m.scores.key and m.scores.nbytes > 0
        entry = store._journal.recent()[-1]
        assert entry.kind == "pull" and sorted(entry.tickets) == sorted(by_ticket)
        assert client.ack_batch(out.batch.batch_id) == 4 and client.stats_snapshot().invariant_holds()
