"""A checkpoint that fails for lack of space (issue #20 item 5), through the real cache service
and the real learner loop (the trainer is test_learner_contract's version counter; the
checkpoint is `checkpoint.ensure_space` with its free-space override, so it runs as root too):

- the learner trains no further step while its checkpoint cannot be written, acks nothing,
  counts every failed attempt and keeps its unsaved batches' claims alive past `batch_claim_s`;
- once space is back the checkpoint is written, the batches it saves are acked and training
  goes on; the accounting invariant holds throughout;
- a stop while it waits ends the loop without an error and without acking.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
from asyncopd.learner import checkpoint
from test_cache_harness import SHARED_REDIS, make_config, running_cache, unique_prefix
from test_learner_contract import BATCH, Learner, feed, wait_for

pytestmark = pytest.mark.service

CLAIM_S = 1.5
NEED = 1 << 20


class Disk:
    """The checkpoint directory's free space, as `ensure_space` sees it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.free = 0

    def save(self, _state: dict[str, Any]) -> None:
        self.root.mkdir(exist_ok=True)
        checkpoint.ensure_space(self.root, NEED, free_bytes=self.free)  # CheckpointSpaceError when short


def claim_deadlines_ms(prefix: str, batch_ids: list[str]) -> list[float]:
    raw = redis.Redis.from_url(SHARED_REDIS)
    try:
        return [float(raw.zscore(f"{prefix}:bclaim", b) or 0.0) for b in batch_ids]
    finally:
        raw.close()


def test_a_full_disk_pauses_training_keeps_the_claims_and_resumes_when_space_is_back(tmp_path: Path) -> None:
    prefix = unique_prefix("diskfull")
    config = make_config(prefix, **{"cache.batch_claim_s": CLAIM_S})
    disk = Disk(tmp_path / "ckpt")
    with running_cache(config) as (cache, client):
        learner = Learner(cache.address, tmp_path, checkpoint_every=2, save=disk.save, checkpoint_retry_max_s=0.2)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        feed(client, prompts, 0)
        wait_for(lambda: learner.loop.checkpoint_failures >= 1, "the checkpoint at version 2 to fail")
        # more scored samples are ready, but no step runs while the checkpoint cannot be written
        more, _, _ = client.acquire_prompts("r0", BATCH)
        assert len(more) == BATCH
        feed(client, more, 2, tag="m")
        time.sleep(2 * CLAIM_S)
        assert learner.trainer.version == 2 and len(learner.trainer.trained) == 2
        assert learner.loop.checkpoint_failures >= 4, "retried with backoff"
        assert learner.error is None and learner.checkpoints == []
        stats = client.stats_snapshot()
        assert stats.trained == 0 and stats.queue_depth["claimed"] == 2 * BATCH and stats.queue_depth["scored"] == BATCH
        assert stats.invariant_holds()
        unsaved = list(learner.loop.unsaved)
        assert len(unsaved) == 2
        # the claims were renewed while it waited (without that they would have lapsed by now)
        now_ms = time.time() * 1000
        assert all(d > now_ms for d in claim_deadlines_ms(prefix, unsaved)), "claims kept alive"

        disk.free = 10 * NEED  # space is back
        wait_for(lambda: client.stats_snapshot().trained == 2 * BATCH, "the saved batches acked")
        assert [c["version"] for c in learner.checkpoints] == [2]
        wait_for(lambda: learner.trainer.version == 3, "training to resume")
        assert learner.loop.acks_refused == 0
        learner.close()
        assert learner.error is None
        stats = client.stats_snapshot()
        assert stats.trained == 3 * BATCH and stats.in_flight == 0 and stats.invariant_holds()
        assert [c["version"] for c in learner.checkpoints] == [2, 3]


def test_a_stop_while_waiting_for_space_ends_cleanly_without_acking(tmp_path: Path) -> None:
    config = make_config(unique_prefix("diskstop"), **{"cache.batch_claim_s": CLAIM_S})
    disk = Disk(tmp_path / "ckpt")
    with running_cache(config) as (cache, client):
        learner = Learner(cache.address, tmp_path, checkpoint_every=2, save=disk.save, checkpoint_retry_max_s=0.2)
        prompts, _, _ = client.acquire_prompts("r0", 2 * BATCH)
        feed(client, prompts, 0)
        wait_for(lambda: learner.loop.checkpoint_failures >= 2, "the checkpoint to fail twice")
        failures = learner.loop.checkpoint_failures
        learner.close()
        assert learner.error is None, "a stop while waiting is a clean end"
        assert learner.loop.checkpoint_failures > failures, "one last attempt on the way out"
        assert learner.checkpoints == [] and len(learner.loop.unsaved) == 2
        stats = client.stats_snapshot()
        assert stats.trained == 0 and stats.invariant_holds(), "nothing acked: the samples come back later"
