"""The cache survives Redis restarts (private redis-server, stopped and started by handle):
with persistence nothing is lost; without it the state is rebuilt, the loss is counted, and
the lost work is produced again. Also: password-protected Redis, and the `serve` entrypoint
as its own process stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import (
    SHARED_REDIS,
    PrivateRedis,
    free_port,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    unique_prefix,
    wipe,
)

pytestmark = pytest.mark.service


def test_redis_restart_with_persistence_loses_nothing(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, appendonly=True).start()
    try:
        config = make_config(unique_prefix("aof"), server.url, max_staleness=0, **{"learner.batch_size": 4})
        with running_cache(config) as (_, client):
            client.publish_version(1)
            prompts, _, _ = client.acquire_prompts("r0", 4)
            rollouts = [make_rollout(p, 1, seed=i) for i, p in enumerate(prompts)]
            client.put_rollouts(rollouts[:3])
            claimed = client.claim_rollouts("t0", 3)
            client.put_scores([make_scores(claimed[0])])
            before = client.stats_snapshot()

            server.restart()
            after = client.stats_snapshot()  # redis-py reconnects a pooled connection that died idle
            keys = ("produced", "in_flight", "bytes_held", "queue_depth", "learner_version")
            assert [getattr(after, k) for k in keys] == [getattr(before, k) for k in keys]

            # An outage in the middle of a request: the put waits for Redis and then lands.
            server.stop()
            restarter = threading.Timer(1.0, server.start)
            restarter.start()
            started = time.monotonic()
            assert client.put_rollouts(rollouts[3:]).accepted == 1
            assert time.monotonic() - started >= 0.9
            restarter.join()
            assert client.stats_snapshot().redis_errors >= 1, "the outage was seen and retried"

            client.put_scores([make_scores(r) for r in claimed[1:]])
            client.put_scores([make_scores(r) for r in client.claim_rollouts("t0", 4)])
            batch = client.pull_batch(4, 1)
            assert batch is not None and client.ack_batch(batch.batch_id) == 4
            stats = client.stats_snapshot()
            assert (stats.produced, stats.trained, stats.dropped) == (4, 4, {})
            assert stats.counters.get("resets", 0) == 0 and stats.invariant_holds()
    finally:
        server.stop()


def test_redis_restart_without_persistence_counts_and_reproduces(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, appendonly=False).start()
    try:
        config = make_config(unique_prefix("wipe"), server.url, max_staleness=1, **{"learner.batch_size": 4})
        with running_cache(config) as (_, client):
            client.publish_version(2)
            prompts, _, _ = client.acquire_prompts("r0", 8)
            assert len(prompts) == 8
            rollouts = [make_rollout(p, 2, seed=i) for i, p in enumerate(prompts)]
            client.put_rollouts(rollouts[:4])
            claimed = client.claim_rollouts("t0", 4)
            client.put_scores([make_scores(r) for r in claimed[:2]])

            server.restart()  # Redis comes back empty
            # The cache restores the version it had seen at once: replicas answering with their
            # current weights (version 2, or 3 after the next broadcast) are not "from the future".
            assert client.stats_snapshot().learner_version == 2
            # The learner re-publishes its version by pulling (nothing is ready yet).
            assert client.pull_batch(4, 2) is None
            # Work that answered the lost state: scores are late, rollouts are counted as lost.
            late = client.put_scores([make_scores(r) for r in claimed[2:]])
            assert (late.accepted, late.duplicates) == (0, 2)
            lost = client.put_rollouts(rollouts[4:])
            assert lost.accepted == 4
            stats = client.stats_snapshot()
            assert stats.counters["resets"] == 1
            assert stats.dropped == {"lost": 4} and stats.produced == 4 and stats.in_flight == 0
            assert stats.learner_version == 2 and stats.invariant_holds()

            # Fresh admission waits for the learner to hand back its prompt cursor (the pull
            # reported the run state re-created mid-run and held); this one has no checkpoint.
            assert client.run_state()[1], "the re-created run state holds fresh admission"
            assert client.acquire_prompts("r1", 8)[0] == []
            client.prompt_cursor([], None)
            assert client.pull_batch(4, 2) is None and not client.run_state()[1]
            # The lost prompts are handed out again and the run goes on.
            again, version, _ = client.acquire_prompts("r1", 8)
            assert len(again) == 8 and version == 2
            assert {p.prompt_id for p in again} >= {p.prompt_id for p in prompts[4:]}
            client.put_rollouts([make_rollout(p, 2, seed=i) for i, p in enumerate(again)])
            client.put_scores([make_scores(r) for r in client.claim_rollouts("t1", 8)])
            for _ in range(2):
                batch = client.pull_batch(4, 2)
                assert batch is not None
                client.ack_batch(batch.batch_id)
            stats = client.stats_snapshot()
            assert (stats.produced, stats.trained, stats.in_flight) == (12, 8, 0)
            assert stats.invariant_holds()
    finally:
        server.stop()


def test_password_protected_redis(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, password="s3cret-pw").start()
    try:
        config = make_config(unique_prefix("auth"), server.url, **{"redis.password": "s3cret-pw"})
        with running_cache(config, wipe_after=False) as (_, client):
            assert len(client.acquire_prompts("r0", 2)[0]) == 2
        wrong = make_config(unique_prefix("auth"), server.url, **{"redis.password": "wrong"})
        with pytest.raises(redis.AuthenticationError), running_cache(wrong, wipe_after=False):
            pass
    finally:
        server.stop()


@pytest.mark.slow  # a fresh interpreter imports torch + transformers and loads the tokenizer
def test_serve_entrypoint_runs_until_sigterm(tmp_path: Path) -> None:
    """`asyncopd serve cache` on the toy task and student tokenizer; SIGTERM stops it cleanly."""
    port = free_port()
    prefix = unique_prefix("serve")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncopd.cli", "serve", "cache", "--name", "cache-it",
         "--set", f"cache.server.port={port}", "--set", f"redis.key_prefix={prefix}",
         "--set", "task.train_size=50",
         "--set", "cache.hold_until_learner=false"],  # no learner begins here: admit at once
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ch = channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(ch).result(timeout=90)
        prompts, version, finished = CacheClient(ch).acquire_prompts("r0", 2, wait_ms=0)
        assert len(prompts) == 2 and version == 0 and not finished
        assert all(p.task.task == "toy" and p.prompt_ids.size > 0 for p in prompts)
        ch.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
        assert b"stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        wipe(SHARED_REDIS, prefix)
