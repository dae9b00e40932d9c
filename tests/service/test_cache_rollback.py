"""A Redis that comes back from an append-only file cut short (the last writes lost, run id kept)
is detected as a rollback, counted, and the cache's own batch claims and acks of the lost tail
are applied again, so a batch the learner trained and acked is neither handed out again nor
left claimed. Real redis-server with AOF on a free port; the cut is a truncated AOF file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncopd.cache.connection import connect
from asyncopd.cache.main import store_policy
from asyncopd.cache.rollback import RollbackGuard
from asyncopd.cache.store import Admission, ExperienceStore, PayloadRef, StoredRollout, StoredScores
from asyncopd.config.redis import RedisConfig
from test_cache_harness import PrivateRedis, make_config, unique_prefix

pytestmark = pytest.mark.service


def _incr_aof(workdir: Path) -> Path:
    files = sorted((workdir / "appendonlydir").glob("*.incr.aof"))
    assert files, f"no incremental AOF under {workdir}"
    return files[-1]


def _cut_back(server: PrivateRedis, aof: Path, cut_at: int) -> None:
    """Redis crashes and comes back from its append-only file cut back to `cut_at` bytes: the
    writes after that are lost, the run id kept (a rollback)."""
    server.stop()
    with aof.open("r+b") as f:
        f.truncate(cut_at)
    server.start()


def _fill(store: ExperienceStore, client: object, prefix: str, n: int) -> None:
    """n scored samples at version 1 (frames written inline by the store)."""
    store.publish_version(1)
    _fill_at_1(store, prefix, n)


def _fill_at_1(store: ExperienceStore, prefix: str, n: int) -> None:
    tickets = store.acquire("r0", n).tickets
    assert len(tickets) == n
    _answer(store, prefix, tickets)


def _answer(store: ExperienceStore, prefix: str, tickets: list[Admission]) -> None:
    """Rollouts for `tickets` at version 1, scored (frames inline)."""
    n = len(tickets)
    rollouts = [
        StoredRollout(f"s{i}", t.ticket, 1, 4, 0, PayloadRef(f"{prefix}:pr:s{i}:0", 8, 0), frame=b"r" * 8)
        for i, t in enumerate(tickets)
    ]
    assert store.put_rollouts(rollouts).accepted == n
    claimed = store.claim_rollouts("t0", n).samples
    scores = [StoredScores(m.sample_id, PayloadRef(f"{prefix}:ps:{m.sample_id}:0", 8, 0), b"s" * 8) for m in claimed]
    assert store.put_scores(scores).accepted == n


def test_a_cut_aof_is_a_rollback_and_lost_claims_and_acks_are_reapplied(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, appendonly=True).start()
    prefix = unique_prefix("rollback")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        _fill(store, client, prefix, 4)
        aof = _incr_aof(tmp_path)
        cut_at = aof.stat().st_size  # everything after this is "the last second" Redis loses

        batch = store.pull_batch(4, 1, "learner").batch
        assert batch is not None and len(batch.samples) == 4
        assert store.ack_batch(batch.batch_id) == 4  # the learner trained it; Redis will forget

        assert aof.stat().st_size > cut_at
        _cut_back(server, aof, cut_at)

        # The first request after the restart finds the rollback before it writes anything.
        again = store.pull_batch(4, 1, "learner").batch
        assert again is None, "a trained batch was handed out again after the rollback"
        stats = store.stats()
        assert store.rollbacks == 1
        assert stats.counters.get("rollbacks") == 1
        assert stats.trained == 4 and stats.in_flight == 0
        assert stats.queue_depth["claimed"] == 0 and stats.queue_depth["scored"] == 0
        assert stats.produced == stats.trained + sum(stats.dropped.values()) + stats.in_flight

        # A second store process on the same Redis (started now) does not count it again, and
        # later writes are not mistaken for another rollback.
        other = ExperienceStore(connect(RedisConfig(url=server.url)), prefix, store_policy(config))
        other.publish_version(2)
        store.publish_version(3)
        assert store.rollbacks == 0 + 1 and other.rollbacks == 0
        assert store.stats().counters.get("rollbacks") == 1
        other.close()
    finally:
        client.close()
        server.stop()


def test_a_sample_lost_whole_is_recreated_and_its_prompt_not_admitted_again(tmp_path: Path) -> None:
    """The cut takes the admission, the put, the scores, the claim and the ack of a batch the
    learner trained: the positions it answered must not come round again."""
    server = PrivateRedis(tmp_path, appendonly=True).start()
    prefix = unique_prefix("rollbackwhole")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        store.publish_version(1)
        aof = _incr_aof(tmp_path)
        cut_at = aof.stat().st_size
        _fill_at_1(store, prefix, 4)  # positions 0..3
        batch = store.pull_batch(4, 1, "learner").batch
        assert batch is not None and store.ack_batch(batch.batch_id) == 4

        _cut_back(server, aof, cut_at)

        assert store.pull_batch(4, 1, "learner").batch is None
        positions = [t.pos for t in store.acquire("r0", 4).tickets]
        assert positions == [4, 5, 6, 7], "the trained prompts were admitted again"
        stats = store.stats()
        assert store.rollbacks == 1 and stats.counters.get("recreated") == 4
        assert (stats.produced, stats.trained, stats.in_flight) == (4, 4, 0)
        assert stats.produced == stats.trained + sum(stats.dropped.values()) + stats.in_flight
    finally:
        client.close()
        server.stop()


def test_no_request_runs_on_the_rolled_back_state_while_the_journal_is_applied(tmp_path: Path) -> None:
    """The learner trained answers to tickets 0..3 that Redis then lost (put, scores, claim). A
    second replica answers the same tickets (re-issued to it) right when the rollback is being
    repaired: its put must wait for the repair, which re-creates the trained samples and closes
    the tickets, and is then a duplicate. Run alongside the repair (CI's chaos run did), it was
    accepted and the same 32 prompts were trained twice."""
    server = PrivateRedis(tmp_path, appendonly=True).start()
    prefix = unique_prefix("rollbackrace")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        store.publish_version(1)
        tickets = store.acquire("r0", 4).tickets  # admitted before the cut: open after it
        aof = _incr_aof(tmp_path)
        cut_at = aof.stat().st_size
        _answer(store, prefix, tickets)
        batch = store.pull_batch(4, 1, "learner").batch
        assert batch is not None and len(batch.samples) == 4  # trained; acks wait for a checkpoint

        _cut_back(server, aof, cut_at)

        repairing, script = threading.Event(), store._script

        def slow_reclaim(name: str, args: Any) -> Any:
            if name == "reclaim":
                repairing.set()
                time.sleep(0.5)
            return script(name, args)

        store._script = slow_reclaim  # type: ignore[method-assign]
        late: list[Any] = []

        def other_replica() -> None:
            repairing.wait(10)
            rollouts = [
                StoredRollout(f"b{i}", t.ticket, 1, 4, 0, PayloadRef(f"{prefix}:pr:b{i}:0", 8, 0), frame=b"r" * 8)
                for i, t in enumerate(tickets)
            ]
            late.append(store.put_rollouts(rollouts))

        thread = threading.Thread(target=other_replica)
        thread.start()
        assert store.pull_batch(4, 1, "learner").batch is None  # finds the rollback, repairs it
        thread.join(20)
        assert repairing.is_set() and len(late) == 1
        assert (late[0].accepted, late[0].duplicates) == (0, 4), "answers to tickets the repair closed were stored"
        assert store.ack_batch(batch.batch_id) == 4
        stats = store.stats()
        assert (stats.produced, stats.trained, stats.in_flight) == (4, 4, 0)
        assert [t.pos for t in store.acquire("r0", 4).tickets] == [4, 5, 6, 7]
    finally:
        client.close()
        server.stop()


def test_a_checkpoint_cursor_read_in_the_lost_tail_does_not_reopen_answered_positions(tmp_path: Path) -> None:
    """The learner's last checkpoint read the cursor state in the writes Redis then lost, so the
    rolled-back cursor is behind the saved one. Positions admitted before the cut and answered and
    trained since must not be re-opened by the next checkpoint's `cursor_state(saved=...)` (CI's
    chaos run trained 16 positions twice this way); a Redis that lost its state (another run id)
    is still restored from the same saved state."""
    server = PrivateRedis(tmp_path, appendonly=True).start()
    prefix = unique_prefix("rollbackcursor")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        epoch = store.begin_learner(False, 0, None).epoch
        store.publish_version(1, epoch=epoch)
        early = store.acquire("r0", 4).tickets  # positions 0..3, admitted before the cut
        assert [t.pos for t in early] == [0, 1, 2, 3]
        aof = _incr_aof(tmp_path)
        cut_at = aof.stat().st_size
        assert [t.pos for t in store.acquire("r1", 4).tickets] == [4, 5, 6, 7]  # lost with the tail
        saved = store.cursor_state(epoch, [])  # the checkpoint taken in the lost tail
        assert saved.cursor == 8 and saved.open == tuple(range(8)) and len(saved.runs) == 1

        _cut_back(server, aof, cut_at)

        # r0 answers 0..3 on the rolled-back state; the learner trains them (acks after its checkpoint)
        _answer(store, prefix, early)
        assert store.rollbacks == 1
        batch = store.pull_batch(4, 1, "learner", epoch=epoch).batch
        assert batch is not None and len(batch.samples) == 4

        state = store.cursor_state(epoch, [batch.batch_id], saved)  # the next checkpoint
        assert state.open == (), "answered and trained positions were re-opened"
        assert store.ack_batch(batch.batch_id, epoch=epoch) == 4
        fresh = [t.pos for t in store.acquire("r0", 4).tickets]
        assert fresh == [4, 5, 6, 7], f"positions handed out again or skipped: {fresh}"
        stats = store.stats()
        assert stats.produced == stats.trained + sum(stats.dropped.values()) + stats.in_flight
    finally:
        client.close()
        server.stop()


@contextmanager
def _begun(tmp_path: Path, name: str) -> Iterator[tuple[ExperienceStore, Any, str, int]]:
    """A store on a private Redis (no AOF) whose learner began and published version 1:
    (store, client, key prefix, learner epoch)."""
    server = PrivateRedis(tmp_path).start()
    prefix = unique_prefix(name)
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        epoch = store.begin_learner(False, 0, None).epoch
        store.publish_version(1, epoch=epoch)
        yield store, client, prefix, epoch
    finally:
        client.close()
        server.stop()


def test_a_saved_cursor_is_restored_into_a_redis_that_lost_its_run(tmp_path: Path) -> None:
    with _begun(tmp_path, "restorecursor") as (store, client, _, epoch):
        store.acquire("r0", 6)
        saved = store.cursor_state(epoch, [])
        assert saved.cursor == 6
        assert store.restore_cursor(epoch, saved) == 0  # same run, cursor not behind
        client.flushall()  # Redis lost everything: a new run state on the next request
        store.publish_version(1, epoch=epoch)
        assert store.restore_cursor(epoch, saved) == 6
        assert sorted(t.pos for t in store.acquire("r0", 8).tickets) == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("recreated", [False, True], ids=["state-gone", "state-recreated"])
def test_a_wipe_between_the_cursor_restore_and_its_read_neither_replays_nor_skips(
    tmp_path: Path, recreated: bool
) -> None:
    """Redis loses everything after a checkpoint's cursor restore and before its read (seen in a
    CI chaos run): the state read must not be the new run's cursor 0, or, handed back later, it
    releases the new run's hold at position 0 and every prompt is trained again."""
    with _begun(tmp_path, "wipemidread") as (store, client, prefix, epoch):
        _fill_at_1(store, prefix, 4)
        batch = store.pull_batch(4, 1, "learner", epoch=epoch).batch
        assert batch is not None and store.ack_batch(batch.batch_id, epoch=epoch) == 4
        saved = store.cursor_state(epoch, [])
        assert (saved.cursor, saved.open) == (4, ())

        restore = store.restore_cursor
        wiped: list[bool] = []

        def restore_then_wipe(*args: Any, **kwargs: Any) -> int:
            n = restore(*args, **kwargs)
            if not wiped:
                wiped.append(True)
                client.flushall()
                if recreated:  # another request of this process re-creates it (holding admission)
                    store.run_state()
            return n

        store.restore_cursor = restore_then_wipe  # type: ignore[method-assign]
        state = store.cursor_state(epoch, [], saved)
        store.restore_cursor = restore  # type: ignore[method-assign]
        assert wiped
        assert state.cursor == 4, f"the checkpoint would record the wiped run's cursor: {state}"
        store.restore_cursor(epoch, state)  # the learner hands it back later (`_follow_run_state`)
        assert sorted(t.pos for t in store.acquire("r0", 4).tickets) == [4, 5, 6, 7]


def test_without_a_rollback_nothing_is_replayed(tmp_path: Path) -> None:
    """A plain restart from a whole AOF (fsync always) is not a rollback: nothing counted."""
    server = PrivateRedis(tmp_path, appendonly=True).start()
    prefix = unique_prefix("norollback")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))
        _fill(store, client, prefix, 4)
        batch = store.pull_batch(4, 1, "learner").batch
        assert batch is not None
        server.restart()
        assert store.ack_batch(batch.batch_id) == 4
        stats = store.stats()
        assert store.rollbacks == 0 and stats.counters.get("rollbacks", 0) == 0
        assert stats.counters.get("reclaimed", 0) == 0 and stats.trained == 4
    finally:
        client.close()
        server.stop()


def test_guard_judges_each_reply_against_what_was_known_when_it_was_sent() -> None:
    guard = RollbackGuard(lambda name: "P:" + name)
    first = guard.mark()
    assert guard.observe(5, 0, first) is None
    slow, fast = guard.mark(), guard.mark()  # two concurrent requests, sent at seen = 5
    assert guard.observe(9, 0, fast) is None  # the later INCR answered first
    assert guard.observe(8, 0, slow) is None, "a reordered reply is no rollback"
    assert guard.observe(7, 0, guard.mark()) == "rollback"  # an INCR below what was seen when sent
    assert guard.observe(9, 0, guard.mark(), after_write=False) is None  # a read equal to it is fine
    assert guard.observe(8, 0, guard.mark(), after_write=False) == "rollback"
    assert guard.observe(10, 1, guard.mark()) == "replay"  # another process counted one
    before = guard.mark()
    assert guard.observe(11, 0, guard.mark()) == "rollback", "the rollback count itself went back"
    assert guard.observe(12, 1, before) is None


def test_concurrent_requests_on_a_healthy_redis_are_never_a_rollback(tmp_path: Path) -> None:
    """The cache's gRPC threads share one store: replies come back in any order."""
    server = PrivateRedis(tmp_path, appendonly=False).start()
    prefix = unique_prefix("rollbackrace")
    config = make_config(prefix, server.url, max_staleness=1, **{"learner.batch_size": 4})
    client = connect(RedisConfig(url=server.url))
    try:
        store = ExperienceStore(client, prefix, store_policy(config))

        errors: list[BaseException] = []

        def hammer(i: int) -> None:
            try:
                for _ in range(40):
                    store.release(f"r{i}", ["nothing"])
                    store.acquire(f"r{i}", 1)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert store.rollbacks == 0 and store.stats().counters.get("rollbacks", 0) == 0
    finally:
        client.close()
        server.stop()
