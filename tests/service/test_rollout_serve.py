"""`asyncopd serve rollout` / `serve teacher` as real processes: serve, answer, stop on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
