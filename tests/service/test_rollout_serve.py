"""`asyncopd serve rollout` / `serve teacher` as real processes: serve, answer, stop on SIGTERM
(at once, also while waiting at the cache with the deployed long waits)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from asyncopd.records import Prompt, TaskInfo
from asyncopd.wire.rollout_client import RolloutClient
from asyncopd.wire.rpc import channel

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_rollout_answers_while_the_cache_is_down_and_stops_on_sigterm() -> None:
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the loop and weight sync keep retrying
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncopd.cli", "serve", "rollout", "--name", "r-serve",
         "--set", f"rollout.server.port={port}", "--set", f"endpoints.cache={dead}",
         "--set", f"endpoints.learner={dead}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ch = channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(ch).result(timeout=120)
        client = RolloutClient(ch)
        deadline = time.monotonic() + 60
        while True:
            try:
                status = client.status()
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert (status.replica, status.engine, status.version) == ("r-serve", "transformers", 0)
        prompt = Prompt("p", np.array([5, 6, 7], dtype=np.int32), TaskInfo("toy", "1"))
        rollouts = client.generate([prompt], temperature=1.0, max_tokens=5)
        assert rollouts[0].replica == "r-serve" and 1 <= rollouts[0].num_tokens <= 5
        ch.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "cache unreachable" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_teacher_refuses_a_student_with_another_tokenizer(tmp_path: Path) -> None:
    from tiny_models import make_tiny_qwen3

    # A student whose tokenizer is not the toy one: a swapped pair of characters.
    student = make_tiny_qwen3(tmp_path / "student")
    text = (student / "tokenizer.json").read_text()
    text = text.replace('"1": ', '"__one__": ').replace('"2": ', '"1": ').replace('"__one__": ', '"2": ')
    (student / "tokenizer.json").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "asyncopd.cli", "serve", "teacher", "--set", f"models.student={student}",
         "--set", f"teacher.server.port={free_port()}"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "share one tokenizer" in proc.stderr


def _serve(role: str, settings: list[str]) -> subprocess.Popen[str]:
    port = ["--set", f"{role}.server.port={free_port()}"]
    argv = [sys.executable, "-m", "asyncopd.cli", "serve", role, "--name", f"{role}-0", *port, *settings]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_rollout_and_a_teacher_waiting_at_the_cache_stop_at_once_on_sigterm() -> None:
    # With the deployed waits (20 s: an idle fleet costs the cache ~nothing) a replica or teacher
    # told to stop cuts its wait instead of sitting it out, and the cache's wait ends with it.
    from asyncopd.config import RunConfig
    from test_cache_harness import make_config, running_cache, unique_prefix

    deployed = RunConfig()
    assert deployed.rollout.acquire_wait_ms >= 10000 and deployed.teacher.claim_wait_ms >= 10000
    config = make_config(unique_prefix("serve-stop"), max_staleness=0, **{"learner.batch_size": 1})
    with running_cache(config) as (cache, client):
        assert len(client.acquire_prompts("holder", 1)[0]) == 1  # the window is full: the replica waits
        dead = f"127.0.0.1:{free_port()}"
        common = ["--set", f"endpoints.cache={cache.address}", "--set", f"redis.key_prefix={config.redis.key_prefix}"]
        procs = [_serve(role, [*common, "--set", f"endpoints.learner={dead}"]) for role in ("rollout", "teacher")]
        store: Any = cache.store
        try:
            deadline = time.monotonic() + 180
            while store.wakeups.sleeping < 2:  # the replica's AcquirePrompts and the teacher's claim
                assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
                assert time.monotonic() < deadline, "the services never waited at the cache"
                time.sleep(0.2)
            t0 = time.monotonic()
            for p in procs:
                p.send_signal(signal.SIGTERM)
            outs = [p.communicate(timeout=60)[0] for p in procs]
            stopped_s = time.monotonic() - t0
            assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
            assert stopped_s < 8.0, f"stopping took {stopped_s:.1f} s: a wait was sat out"
            deadline = time.monotonic() + 2
            while store.wakeups.sleeping and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not store.wakeups.sleeping, "the cache still waits for callers that stopped"
            assert client.stats_snapshot().admitted == 1  # nothing was admitted to the stopped replica
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
