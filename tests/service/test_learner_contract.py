"""The learner <-> cache contract (issue 20), through the real cache service (gRPC on loopback,
Redis behind it) and the real learner loop; only the trainer is a stand-in (a version counter,
whose "checkpoint" is a copy of its state), so each test takes about a second:

- trained means saved: a learner that trained batches but died before its checkpoint leaves
  them counted not trained, and they come back (here: dropped as stale after the restart's
  version jump), the accounting exact; the checkpoint acks them, in order;
- a restarted learner starts at max(published, checkpoint) + max_staleness + 2, and a rollout
  stamped with the old incarnation's newest possible version is stale from then on;
- a Redis wipe followed by a resume continues the prompt cursor from the checkpoint: the
  positions open at the checkpoint are re-issued, nothing trained before is handed out again,
  nothing is skipped;
- a learner start fences out the previous learner: its pull, ack and publish are refused with
  PERMISSION_DENIED, and its loop stops without checkpointing.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from asyncopd.learner.loop import LearnerFenced, LearnerLoop, LoopSettings
from asyncopd.learner.trainer import StepStats
from asyncopd.records import Prompt
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import make_config, make_rollout, make_scores, running_cache, unique_prefix, wipe

pytestmark = pytest.mark.service

BATCH = 4
ETA = 1  # make_config's max_staleness


class CountingTrainer:
    """What the loop needs of a Trainer: a version (one step per batch), the state it checkpoints."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.version = 0
        self.prompt_cursor: dict[str, Any] | None = None
        self.trained: list[list[str]] = []
        if state is not None:
            self.version, self.prompt_cursor = state["version"], state.get("prompt_cursor")

    def train(self, samples: Sequence[Any]) -> list[StepStats]:
        self.version += 1
        self.trained.append([s.rollout.sample_id for s in samples])
        return [StepStats(self.version, len(samples), 10, 1e-3, 0.5, {"loss": 1.0})]

    def named_weights(self) -> list[Any]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, **({"prompt_cursor": self.prompt_cursor} if self.prompt_cursor else {})}


def position(prompt: Prompt) -> int:
    return int(prompt.ticket.rsplit("-", 1)[1])


def feed(client: CacheClient, prompts: Sequence[Prompt], version: int, tag: str = "") -> None:
    """Answer `prompts` with rollouts stamped `version` and score them all."""
    rollouts = [make_rollout(p, version, num_tokens=4, sample_id=f"s{tag}{position(p)}") for p in prompts]
    client.put_rollouts(rollouts)
    claimed = client.claim_rollouts("t0", len(rollouts))
    assert client.put_scores([make_scores(r) for r in claimed]).accepted == len(rollouts)


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Learner:
    """A LearnerLoop on its own thread and its own cache client (its own fencing epoch)."""

    def __init__(
        self,
        address: str,
        tmp_path: Path,
        *,
        trainer: CountingTrainer | None = None,
        resumed_from: int | None = None,
        checkpoint_every: int = 100,
        save: Callable[[dict[str, Any]], None] | None = None,
        **settings: Any,
    ) -> None:
        self.channel = channel(address)
        self.client = CacheClient(self.channel, timeout_s=30.0)
        self.trainer = trainer or CountingTrainer()
        self.checkpoints: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def checkpoint() -> Path:
            state = copy.deepcopy(self.trainer.state_dict())
            if save is not None:
                save(state)  # may raise: the process "dies" before the checkpoint is durable
            self.checkpoints.append(state)
            return tmp_path

        settings = LoopSettings(
            steps=1000, batch_size=BATCH, pull_wait_ms=100, checkpoint_every=checkpoint_every, **settings
        )
        self.loop = LearnerLoop(
            self.trainer,  # type: ignore[arg-type]
            self.client,
            None,
            settings,
            stop=self.stop,
            step_log=tmp_path / f"steps-{id(self)}.jsonl",
            save_checkpoint=checkpoint,
            resumed_from=resumed_from,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.loop.start is not None or self.error is not None, "the learner to begin")

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # reported to the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.channel.close()


def test_trained_batches_are_acked_only_by_the_checkpoint_that_saves_them(tmp_path: Path) -> None:
    config = make_config(unique_prefix("saved"), **{"cache.batch_claim_s": 2.0})
    with running_cache(config) as (cache, client):
        # a learner that trains three batches and dies writing its checkpoint
        def die(_: dict[str, Any]) -> None:
            raise OSError("killed before the checkpoint was durable")

        dead = Learner(cache.address, tmp_path, save=die)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)  # the whole window, (eta + 1) * B
        feed(client, prompts, 0)
        wait_for(lambda: client.stats_snapshot().counters.get("consumed") == 2 * BATCH, "two trained batches")
        # admission is not held shut by the unacked batches: their slots count as consumed
        more, _, _ = client.acquire_prompts("r0", BATCH)
        assert len(more) == BATCH
        feed(client, more, dead.trainer.version)
        wait_for(lambda: dead.trainer.version == 3, "three trained batches")
        assert len(dead.loop.unsaved) == 3
        stats = client.stats_snapshot()
        assert (stats.trained, stats.queue_depth["claimed"]) == (0, 3 * BATCH), "trained, not saved: not acked"
        dead.close()
        # its final checkpoint failed: it stops without acking (and without raising)
        assert dead.error is None and dead.checkpoints == [] and dead.loop.checkpoint_failures == 1
        stats = client.stats_snapshot()
        assert stats.trained == 0 and stats.invariant_holds()

        # the restart voids the dead learner's claims at once; its samples come back and, past
        # the version jump, are stale: dropped and counted, never counted trained
        alive = Learner(cache.address, tmp_path, checkpoint_every=1)
        assert alive.loop.start is not None and alive.loop.start.start_version == 3 + ETA + 2
        wait_for(lambda: client.stats_snapshot().dropped.get("stale", 0) == 3 * BATCH, "the stale drops")
        stats = client.stats_snapshot()
        assert stats.trained == 0 and stats.queue_depth["claimed"] == 0 and stats.invariant_holds()

        # with checkpoint_every = 1 every trained batch is saved, then acked
        fresh, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        assert len(fresh) == 2 * BATCH
        feed(client, fresh, alive.trainer.version, tag="b")
        wait_for(lambda: client.stats_snapshot().trained == 2 * BATCH, "two saved batches acked")
        assert [c["version"] for c in alive.checkpoints] == [7, 8]
        assert alive.loop.unsaved == []
        alive.close()
        stats = client.stats_snapshot()
        assert stats.invariant_holds() and stats.trained == 2 * BATCH and stats.in_flight == 0


def test_a_restarted_learner_jumps_past_every_version_a_replica_may_have_stamped(tmp_path: Path) -> None:
    config = make_config(unique_prefix("jump"))
    with running_cache(config) as (cache, client):
        first = CacheClient(channel(cache.address))
        assert first.begin_learner("l").start_version == 0, "the first learner of a run starts at 0"
        first.publish_version(5)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        # no checkpoint: max(published 5) + eta 1 + 2
        second = CacheClient(channel(cache.address))
        start = second.begin_learner("l")
        assert (start.published, start.start_version) == (5, 8)
        # from a checkpoint newer than the published version: max(6, 5) + 3
        third = CacheClient(channel(cache.address))
        assert third.begin_learner("l", checkpoint_version=6).start_version == 9
        third.publish_version(9)
        # the old incarnation's weights could have stamped version 6 (published 5 + 1): stale now
        client.put_rollouts([make_rollout(prompts[0], 6, num_tokens=4, sample_id="old")])
        client.put_rollouts([make_rollout(prompts[1], 9, num_tokens=4, sample_id="new")])
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": 1} and stats.queue_depth["unscored"] == 1


def test_a_redis_wipe_and_resume_continue_the_prompt_cursor(tmp_path: Path) -> None:
    prefix = unique_prefix("cursor")
    config = make_config(prefix)
    with running_cache(config, wipe_after=False) as (cache, client):
        learner = Learner(cache.address, tmp_path, checkpoint_every=3)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        assert [position(p) for p in prompts] == list(range(2 * BATCH))
        feed(client, prompts, 0)
        wait_for(lambda: client.stats_snapshot().counters.get("consumed") == 2 * BATCH, "two trained batches")
        later, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        assert [position(p) for p in later] == list(range(2 * BATCH, 4 * BATCH))
        feed(client, later[BATCH:], learner.trainer.version)  # 12..15 trained; 8..11 stay open (tickets out)
        wait_for(lambda: len(learner.checkpoints) == 1, "the checkpoint at version 3")
        learner.close()
        checkpoint = learner.checkpoints[-1]
        saved = checkpoint["prompt_cursor"]
        assert {k: saved[k] for k in ("cursor", "open")} == {"cursor": 16, "open": [8, 9, 10, 11]}
        assert len(saved["runs"]) == 1 and saved["runs"][0], "the run id the state was read from"
        assert client.stats_snapshot().trained == 3 * BATCH
    wipe(config.redis.url, prefix)  # Redis lost everything (and the cache restarted)
    with running_cache(config) as (cache, client):
        assert client.stats_snapshot().produced == 0
        resumed = Learner(
            cache.address, tmp_path, trainer=CountingTrainer(checkpoint), resumed_from=checkpoint["version"]
        )
        assert resumed.loop.start is not None and resumed.loop.start.cursor_restored == 4
        again, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        # the open positions first (re-issued), then on from the cursor: nothing trained is
        # handed out again, nothing is skipped
        assert [position(p) for p in again] == [8, 9, 10, 11, 16, 17, 18, 19]
        assert [p.prompt_id for p in again[:BATCH]] == [p.prompt_id for p in later[:BATCH]]
        feed(client, again, resumed.trainer.version)
        wait_for(lambda: resumed.trainer.version == 3 + ETA + 2 + 2, "two batches after the resume")
        resumed.close()
        stats = client.stats_snapshot()
        assert stats.trained == 2 * BATCH and stats.invariant_holds() and stats.in_flight == 0


@pytest.mark.parametrize("hold", [True, False])
def test_a_fresh_cache_on_a_wiped_redis_admits_nothing_before_the_learner(tmp_path: Path, hold: bool) -> None:
    """Redis lost everything while the cache was down too: the new cache process cannot tell a
    lost run from a new one. With `cache.hold_until_learner` (the default) it admits nothing until
    a learner begins and hands back its checkpoint's cursor, so the replicas that come first get
    no position the run trained; without it they get position 0 again (the replay the option is
    for: the negative control)."""
    prefix = unique_prefix("freshwipe")
    config = make_config(prefix, **{"cache.hold_until_learner": hold})
    with running_cache(config, wipe_after=False) as (cache, client):
        held, _, _ = client.acquire_prompts("r0", BATCH)
        # a new run: admission opens with the learner's begin (at once without the hold)
        assert len(held) == (0 if hold else BATCH)
        learner = Learner(cache.address, tmp_path, checkpoint_every=2)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH - len(held))
        prompts = [*held, *prompts]
        assert [position(p) for p in prompts] == list(range(2 * BATCH))
        feed(client, prompts, 0)
        wait_for(lambda: len(learner.checkpoints) == 1, "the checkpoint at version 2")
        learner.close()
        checkpoint = learner.checkpoints[-1]
        assert checkpoint["prompt_cursor"]["cursor"] == 2 * BATCH
    wipe(config.redis.url, prefix)  # Redis lost everything, and the cache restarted
    with running_cache(config) as (cache, client):
        early, _, _ = client.acquire_prompts("r0", 2 * BATCH, wait_ms=200)  # a replica before the learner
        if not hold:
            assert [position(p) for p in early] == list(range(2 * BATCH)), "without the hold: replayed"
            return
        assert early == [], "a fresh process admitted positions a learner may have trained"
        resumed = Learner(
            cache.address, tmp_path, trainer=CountingTrainer(checkpoint), resumed_from=checkpoint["version"]
        )
        again, _, _ = client.acquire_prompts("r0", BATCH, wait_ms=2000)
        assert [position(p) for p in again] == list(range(2 * BATCH, 3 * BATCH)), "nothing replayed or skipped"
        resumed.close()


def test_a_redis_wipe_under_a_live_learner_neither_replays_nor_skips_prompts(tmp_path: Path) -> None:
    """Redis loses everything while the cache and the learner keep running: the re-created run
    state admits nothing fresh (it would start at position 0 again) until the learner's next pull
    sees the new run and hands back its checkpoint's cursor state with the tickets it trained
    since; then the open positions are re-issued, the trained ones are not, and the cursor goes on
    past both."""
    config = make_config(unique_prefix("livewipe"))
    with running_cache(config) as (cache, client):
        learner = Learner(cache.address, tmp_path, checkpoint_every=3)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        feed(client, prompts, 0)
        wait_for(lambda: client.stats_snapshot().counters.get("consumed") == 2 * BATCH, "two trained batches")
        later, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        assert [position(p) for p in later] == list(range(2 * BATCH, 4 * BATCH))
        feed(client, later[BATCH:], learner.trainer.version)  # 12..15 trained; 8..11 stay open
        wait_for(lambda: len(learner.checkpoints) == 1, "the checkpoint at version 3")
        wait_for(lambda: client.stats_snapshot().trained == 3 * BATCH, "the checkpoint's acks")
        more, _, _ = client.acquire_prompts("r0", BATCH)
        assert [position(p) for p in more] == [16, 17, 18, 19]
        feed(client, more, learner.trainer.version)
        wait_for(lambda: learner.trainer.version == 4, "a batch trained after the checkpoint (unsaved)")

        wipe(config.redis.url, config.redis.key_prefix)  # Redis lost everything; nobody restarted
        wait_for(lambda: learner.loop.cursor_restores == 1, "the learner to hand its cursor back")
        assert learner.error is None
        again, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        assert [position(p) for p in again] == [8, 9, 10, 11, 20, 21, 22, 23], (
            "positions trained before the wipe were handed out again, or some were skipped"
        )
        learner.close()


def test_a_new_learner_fences_out_the_old_one(tmp_path: Path) -> None:
    config = make_config(unique_prefix("fence"))
    with running_cache(config) as (cache, client):
        old = Learner(cache.address, tmp_path)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        feed(client, prompts[:BATCH], 0)
        wait_for(lambda: old.trainer.version == 1, "the old learner's first batch")
        pending = list(old.loop.unsaved)
        new = CacheClient(channel(cache.address))
        start = new.begin_learner("l2")
        assert start.epoch == old.client.learner_epoch + 1
        old.thread.join(10)
        assert isinstance(old.error, LearnerFenced), "the fenced learner's loop stops"
        assert old.checkpoints == [], "a fenced learner writes no checkpoint"
        for call in (
            lambda: old.client.pull_batch(BATCH, start.start_version),
            lambda: old.client.ack_batch(pending[0]),
            lambda: old.client.publish_version(start.start_version + 1),
            lambda: client.publish_version(start.start_version + 1),  # unfenced (epoch 0)
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "fenced" in (refused.value.details() or "")
        # the new learner works, and the old learner's batch came back to it (stale: dropped)
        new.publish_version(start.start_version)
        feed(client, prompts[BATCH:], start.start_version, tag="n")
        batch = new.pull_batch(BATCH, start.start_version, wait_ms=2000)
        assert batch is not None and {s.rollout.sample_id for s in batch.samples} == {
            f"sn{position(p)}" for p in prompts[BATCH:]
        }
        assert new.ack_batch(batch.batch_id) == BATCH
        stats = client.stats_snapshot()
        assert stats.dropped == {"stale": BATCH} and stats.trained == BATCH and stats.invariant_holds()
        old.close()


def test_malformed_learner_requests_are_refused_whole(tmp_path: Path) -> None:
    """A cursor whose open positions are not below it, a negative epoch, more kept batches than
    the cap: INVALID_ARGUMENT, and nothing changed (the epoch was not taken, the cursor not moved)."""
    from asyncopd.v1 import cache_pb2, cache_pb2_grpc

    config = make_config(unique_prefix("malformed"))
    with running_cache(config) as (cache, client):
        stub = cache_pb2_grpc.CacheServiceStub(channel(cache.address))
        state = cache_pb2.CursorState
        bad = [
            (stub.BeginLearner, cache_pb2.BeginLearnerRequest(cursor=cache_pb2.CursorState(cursor=4, open=[4]))),
            (stub.BeginLearner, cache_pb2.BeginLearnerRequest(cursor=cache_pb2.CursorState(cursor=-1))),
            (stub.BeginLearner, cache_pb2.BeginLearnerRequest(cursor=state(cursor=1, runs=["r" * 257]))),
            (stub.PromptCursor, cache_pb2.PromptCursorRequest(saved=state(cursor=1, runs=["r"] * 1025))),
            (stub.PullBatch, cache_pb2.PullBatchRequest(size=1, learner_epoch=-1)),
            (stub.PullBatch, cache_pb2.PullBatchRequest(size=1, keep_batch_ids=["b"] * 4097)),
            (stub.PromptCursor, cache_pb2.PromptCursorRequest(trained_batch_ids=[""])),
        ]
        for method, request in bad:
            with pytest.raises(grpc.RpcError) as refused:
                method(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert client.begin_learner("l").epoch == 1, "no refused request took an epoch"
        prompts, _, _ = client.acquire_prompts("r0", 1)
        assert [position(p) for p in prompts] == [0], "no refused request moved the cursor"


def test_a_keep_alive_pull_extends_kept_claims_and_claims_nothing(tmp_path: Path) -> None:
    """PullBatch(size=0, keep_batch_ids=...) is what a learner waiting out a failed checkpoint
    sends: the kept claims outlive their deadline, no new batch is claimed though one is ready,
    the published version does not move; size 0 without kept batches is INVALID_ARGUMENT."""
    from asyncopd.v1 import cache_pb2, cache_pb2_grpc

    config = make_config(unique_prefix("keepalive"), **{"cache.batch_claim_s": 1.0})
    with running_cache(config) as (cache, client):
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        feed(client, prompts, 0)
        batch = client.pull_batch(BATCH, 0)
        assert batch is not None
        deadline = time.monotonic() + 2.5  # past the 1 s claim more than twice
        while time.monotonic() < deadline:
            assert client.pull_batch(0, 7, keep=[batch.batch_id]) is None, "a keep-alive claims nothing"
            time.sleep(0.3)
        stats = client.stats_snapshot()
        assert stats.queue_depth["scored"] == BATCH, "the ready batch was not claimed"
        assert client.published_version() == 0, "a keep-alive does not publish its version"
        # a real pull returns expired claims to the pool first: the kept one is not among them
        other = client.pull_batch(BATCH, 0)
        assert other is not None and not {s.rollout.sample_id for s in other.samples} & {
            s.rollout.sample_id for s in batch.samples
        }
        assert client.stats_snapshot().queue_depth["claimed"] == 2 * BATCH, "the kept claim did not expire"
        assert client.ack_batch(batch.batch_id) == BATCH
        stub = cache_pb2_grpc.CacheServiceStub(channel(cache.address))
        with pytest.raises(grpc.RpcError) as refused:
            stub.PullBatch(cache_pb2.PullBatchRequest(size=0, learner_version=0), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.stats_snapshot().invariant_holds()
