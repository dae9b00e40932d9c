"""The learner service end to end: a real cache (Redis) feeding scored batches, the learner as
a subprocess (`asyncopd serve learner`), and a weight-sync subscriber in this process.

SIGTERM -> the learner checkpoints at the version it reached -> restart with learner.resume
-> it continues at that same version, and the first weights it broadcasts are bit-identical
to the ones the replica held before the restart (and to the checkpoint on disk).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner import checkpoint
from asyncopd.tasks.toy.tokenizer import build_tokenizer
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.wire.learner_client import LearnerClient, LearnerStatus
from asyncopd.wire.rpc import channel
from test_cache_harness import VOCAB, free_port, make_config, running_cache, unique_prefix
from test_cache_service import produce_and_score
from transformers import Qwen3Config, Qwen3ForCausalLM

pytestmark = pytest.mark.service


def tiny_student(directory: Path) -> Path:
    """A tiny Qwen3 over the cache harness's 64-token vocabulary."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(config).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def wait_for(predicate: Callable[[], Any], timeout: float = 240.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.1)


def status(client: LearnerClient) -> LearnerStatus | None:
    try:
        return client.status()
    except grpc.RpcError:
        return None


def test_sigterm_checkpoint_then_resume_past_the_staleness_bound(tmp_path: Path) -> None:
    """SIGTERM writes a checkpoint of the reached version; the resumed learner holds the same
    weights and numbers them max(published, checkpoint) + max_staleness + 2 (a restart's jump,
    asyncopd.cache.policy), so no rollout of the previous incarnation looks fresh."""
    student = tiny_student(tmp_path / "student")
    port = free_port()
    base = make_config(unique_prefix("learner"), max_staleness=4)
    with running_cache(base) as (cache, feed):
        data = base.model_dump(mode="json")
        data["redis"]["password"] = None
        data["models"] = {"student": str(student), "teacher": str(student)}
        data["loss"] = {"kind": "forward_kl_topk", "tail": "drop", "k": 4}
        data["learner"].update(
            batch_size=4,
            steps=100,
            lr=1e-3,
            checkpoint_every=100,  # only the SIGTERM checkpoint matters here
            checkpoint_dir=str(tmp_path / "ckpt"),
            pull_wait_ms=200,
            server={"port": port, "metrics_port": 0},
        )
        data["weightsync"] = {"timeout_s": 3.0}
        data["endpoints"] = {"cache": cache.address, "learner": f"127.0.0.1:{port}"}
        data["output_dir"] = str(tmp_path / "run")
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(data))

        def start(*extra: str) -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-m", "asyncopd.cli", "serve", "learner", "-c", str(cfg_path), "--name", "learner-0"]
            return subprocess.Popen([*cmd, *extra], env={**os.environ, "HF_HUB_OFFLINE": "1"})

        received: list[tuple[int, dict[str, torch.Tensor]]] = []

        def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
            received.append((version, {n: t.clone() for n, t in named}))

        stop = threading.Event()
        learner_addr = f"127.0.0.1:{port}"
        sub = threading.Thread(
            target=run_subscriber, args=(learner_addr, "replica-0", apply, stop, WeightSyncConfig(timeout_s=3.0))
        )
        proc = start()
        chan = channel(learner_addr)
        client = LearnerClient(chan, timeout_s=5.0)
        try:
            sub.start()
            first = wait_for(lambda: status(client), what="learner up")
            assert first.version == 0
            wait_for(lambda: received and received[-1][0] == 0, what="replica got version 0")
            for _ in range(3):  # one batch at a time: each pulled batch is one optimizer step
                v = client.status().version
                produce_and_score(feed, "r0", v, 4)
                wait_for(lambda v=v: client.status().version > v, what=f"a step after version {v}")
            reached = client.status().version
            assert reached == 3
            wait_for(lambda: received[-1][0] == reached, what="replica at the reached version")
            before = received[-1][1]

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            saved = checkpoint.latest(tmp_path / "ckpt")
            assert saved is not None
            assert json.loads((saved / "learner.json").read_text())["version"] == reached
            on_disk = Qwen3ForCausalLM.from_pretrained(saved).state_dict()
            assert all(torch.equal(on_disk[n], t) for n, t in before.items() if n in on_disk)
            steps = [json.loads(line) for line in (tmp_path / "run" / "learner_steps.jsonl").read_text().splitlines()]
            assert [s["version"] for s in steps if s["event"] == "step"] == [1, 2, 3]
            assert {"loss", "kl", "staleness_max", "seconds"} <= set(steps[-1])

            n_before = len(received)
            proc = start("--set", "learner.resume=true")
            resumed = wait_for(lambda: status(client), what="learner back up")
            jumped = reached + 4 + 2  # max_staleness 4
            assert resumed.version == jumped
            wait_for(lambda: len(received) > n_before, what="replica re-registered with the restarted learner")
            version, weights = received[n_before]
            assert version == jumped
            assert weights.keys() == before.keys()
            assert all(torch.equal(weights[n], before[n]) for n in before)

            produce_and_score(feed, "r0", jumped, 4)
            wait_for(lambda: client.status().version == jumped + 1, what="training continues after resume")
        finally:
            stop.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            sub.join(timeout=30)
            chan.close()
