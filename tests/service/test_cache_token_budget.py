"""Token-budget admission (cache.max_tokens_in_flight) and the per-token staleness rule
(stale_tokens: drop | mask), as the Lua scripts apply them, against the machine's Redis.

Token budget: every ticket handed out reserves rollout.sampling.max_tokens; admission stops
when the next ticket would not fit, and a put, a release or an expired lease frees exactly what
the ticket held (cnt.tok_reserved is the sum of the open tickets' reservations at every step).
Stale tokens: eta = 2 at learner version 5 (oldest usable 3). A sample whose tokens are all at
3 is kept either way; one whose oldest token is at 2 and newest at 3 is dropped under drop and
kept under mask (counted in cnt.masked_samples when served); one wholly at 2 is dropped either
way. produced = trained + dropped + in_flight holds throughout."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis
from asyncopd.cache.main import store_policy
from asyncopd.cache.store import ExperienceStore, PayloadRef, StoredRollout, StoredScores
from asyncopd.wire.payload import payload_key
from test_cache_harness import SHARED_REDIS, make_config, unique_prefix, wipe

pytestmark = pytest.mark.service


@pytest.fixture
def client():
    c = redis.Redis.from_url(SHARED_REDIS)
    yield c
    c.close()


def _frame(client: redis.Redis, prefix: str, kind: str, sid: str) -> PayloadRef:
    ref = PayloadRef(payload_key(prefix, kind, sid, "00000000"), 8, 0)  # type: ignore[arg-type]
    client.set(ref.key, b"x" * 8)
    return ref


def _reserved(client: redis.Redis, store: ExperienceStore) -> tuple[int, int]:
    """(cnt.tok_reserved, the sum of 'tk' over every open ticket's hash): equal when exact."""
    counter = int(client.hget(store.key("cnt"), "tok_reserved") or 0)
    total = sum(int(client.hget(key, "tk") or 0) for key in client.scan_iter(match=store.key("t:*")))
    return counter, total


def _invariant(store: ExperienceStore) -> None:
    s = store.stats()
    assert s.produced == s.trained + sum(s.dropped.values()) + s.in_flight, s


def test_token_budget_refuses_beyond_it_and_frees_on_put_release_and_expiry(client: redis.Redis) -> None:
    prefix = unique_prefix("tokbudget")
    config = make_config(prefix, **{"rollout.sampling.max_tokens": 100, "cache.max_tokens_in_flight": 250})
    # leases long enough that none runs out before the step that waits for it on a loaded box
    # (0.2 s expired mid-test under load), short enough to wait out
    policy = dataclasses.replace(store_policy(config), prompt_lease_s=1.5)
    assert (policy.max_tokens_in_flight, policy.tokens_per_ticket) == (250, 100)
    try:
        store = ExperienceStore(client, prefix, policy)
        assert store.window == 8  # the sample window has room for 8; the token budget for 2
        first = store.acquire("r0", 5).tickets
        assert len(first) == 2 and _reserved(client, store) == (200, 200)
        assert store.acquire("r0", 5).tickets == []  # a third ticket would hold 300 > 250

        # a put frees the ticket's reservation and counts the tokens actually generated
        ref = _frame(client, prefix, "r", "a")
        out = store.put_rollouts([StoredRollout("a", first[0].ticket, 0, 37, 0, ref, 0)])
        assert out.accepted == 1 and _reserved(client, store) == (100, 100)
        assert int(client.hget(store.key("cnt"), "tokens_produced") or 0) == 37
        second = store.acquire("r0", 5).tickets
        assert len(second) == 1 and _reserved(client, store) == (200, 200)

        # a released ticket frees its tokens; handed out again, it reserves them again
        assert store.release("r0", [second[0].ticket]) == 1
        assert _reserved(client, store) == (100, 100)
        again = store.acquire("r1", 5).tickets
        assert [t.ticket for t in again] == [second[0].ticket] and _reserved(client, store) == (200, 200)

        # expired leases free theirs (nobody is generating them), and re-issue reserves anew
        # (the budget is full: both fit again only because the expired ones were freed first)
        time.sleep(1.6)
        back = store.acquire("r2", 5)
        assert back.reissued_expired == 2 and len(back.tickets) == 2
        assert _reserved(client, store) == (200, 200)
        assert {client.hget(store.key(f"t:{t.ticket}"), "replica") for t in back.tickets} == {b"r2"}
        _invariant(store)
    finally:
        wipe(SHARED_REDIS, prefix)


def test_no_token_budget_admits_up_to_the_window(client: redis.Redis) -> None:
    prefix = unique_prefix("tokoff")
    config = make_config(prefix, **{"rollout.sampling.max_tokens": 100})
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        assert len(store.acquire("r0", 100).tickets) == 8
        assert _reserved(client, store) == (800, 800)  # counted either way; refused only with a budget
    finally:
        wipe(SHARED_REDIS, prefix)


@pytest.mark.parametrize("rule", ["drop", "mask"])
def test_stale_tokens_rule_at_the_boundary(client: redis.Redis, rule: str) -> None:
    prefix = unique_prefix(f"stale-{rule}")
    config = make_config(prefix, max_staleness=2, stale_tokens=rule)
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        tickets = store.acquire("r0", 3).tickets
        store.publish_version(5)  # oldest usable: 3
        versions = {"fresh": (3, 3), "crossing": (2, 3), "old": (2, 2)}  # (oldest, newest) token version
        rollouts = [
            StoredRollout(sid, t.ticket, ov, 10, 0, _frame(client, prefix, "r", sid), nv)
            for t, (sid, (ov, nv)) in zip(tickets, versions.items(), strict=True)
        ]
        out = store.put_rollouts(rollouts)
        kept = ["fresh", "crossing"] if rule == "mask" else ["fresh"]
        assert (out.accepted, out.stale) == (3, 3 - len(kept))
        claimed = store.claim_rollouts("t0", 10).samples
        assert sorted(m.sample_id for m in claimed) == sorted(kept)
        store.put_scores([StoredScores(m.sample_id, _frame(client, prefix, "s", m.sample_id)) for m in claimed])
        pulled = store.pull_batch(len(kept), 5, "learner").batch
        assert pulled is not None
        staleness = dict(zip([m.sample_id for m in pulled.samples], pulled.staleness, strict=True))
        # staleness is the oldest token's: 3 for the crossing sample (its version-2 tokens are masked)
        assert staleness == ({"fresh": 2, "crossing": 3} if rule == "mask" else {"fresh": 2})
        masked = int(client.hget(store.key("cnt"), "masked_samples") or 0)
        assert masked == (1 if rule == "mask" else 0)
        assert store.ack_batch(pulled.batch_id) == len(kept)
        s = store.stats()
        assert (s.trained, s.dropped) == (len(kept), {"stale": 3 - len(kept)})
        _invariant(store)
    finally:
        wipe(SHARED_REDIS, prefix)


def test_mask_drops_once_the_newest_token_is_beyond_the_bound(client: redis.Redis) -> None:
    """Under mask a kept sample waits in the pool by its newest version: one version later
    (newest 3 at learner 6, oldest usable 4) it is dropped at pull, not served."""
    prefix = unique_prefix("stale-mask-late")
    config = make_config(prefix, max_staleness=2, stale_tokens="mask", **{"learner.batch_size": 2})
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        tickets = store.acquire("r0", 2).tickets
        store.publish_version(5)
        rollouts = [
            StoredRollout(sid, t.ticket, ov, 10, 0, _frame(client, prefix, "r", sid), nv)
            for t, (sid, ov, nv) in zip(tickets, [("crossing", 2, 3), ("newer", 2, 4)], strict=True)
        ]
        assert store.put_rollouts(rollouts).accepted == 2
        claimed = store.claim_rollouts("t0", 10).samples
        store.put_scores([StoredScores(m.sample_id, _frame(client, prefix, "s", m.sample_id)) for m in claimed])
        out = store.pull_batch(1, 6, "learner")
        assert out.stale_dropped == 1 and out.batch is not None
        assert [m.sample_id for m in out.batch.samples] == ["newer"]
        _invariant(store)
    finally:
        wipe(SHARED_REDIS, prefix)
