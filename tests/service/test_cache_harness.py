"""Shared pieces of the cache service tests: a tiny prompt set, rollout/score factories, an
in-process cache server on a free port, and private `redis-server` processes by handle.

Each test uses its own Redis key prefix, so tests never see each other's (or other helpers')
state on the shared Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from asyncopd.cache.connection import delete_prefix
from asyncopd.cache.main import RunningCache, start_cache
from asyncopd.config import RunConfig, config_from_dict
from asyncopd.records import Prompt, Rollout, SupportKind, TeacherScores
from asyncopd.tasks import PromptItem
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from required_tools import require_tool

VOCAB = 64
SHARED_REDIS = "redis://127.0.0.1:6379/0"


def tokenize(text: str) -> list[int]:
    """A character tokenizer into the tiny test vocabulary."""
    return [1 + (ord(c) % (VOCAB - 1)) for c in text]


def tiny_prompts(n: int = 40) -> list[PromptItem]:
    return [PromptItem(prompt_id=f"p/{i}", prompt=f"{i}+{i}=", answer=str(2 * i), grader="toy") for i in range(n)]


def make_config(prefix: str, redis_url: str = SHARED_REDIS, **values: Any) -> RunConfig:
    """A run config for the tests; `values` are dotted keys, e.g. {"cache.eviction": "lru"}."""
    data: dict[str, Any] = {
        "max_staleness": 1,
        "learner": {"batch_size": 4},
        "redis": {"url": redis_url, "key_prefix": prefix},
        # no learner begins in most cache tests: admit at once (the hold has tests of its own)
        "cache": {"server": {"port": 0, "workers": 32}, "redis_retry_s": 20.0, "hold_until_learner": False},
    }
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(data)


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn` on a daemon thread; the dict gets its return value and how long it took."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        out["value"] = fn()
        out["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def unique_prefix(tag: str = "t") -> str:
    return f"test-cache-{tag}-{uuid.uuid4().hex[:10]}"


def wipe(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


@contextmanager
def running_cache(
    config: RunConfig, prompts: Sequence[PromptItem] | None = None, wipe_after: bool = True
) -> Iterator[tuple[RunningCache, CacheClient]]:
    """A cache server on a free port and a client to it; Redis keys are wiped afterwards."""
    cache = start_cache(
        config,
        "cache-test",
        prompts=prompts or tiny_prompts(),
        tokenize=tokenize,
        vocab_size=VOCAB,
        serve_metrics=False,
    )
    ch = channel(cache.address)
    try:
        yield cache, CacheClient(ch, timeout_s=30.0)
    finally:
        ch.close()
        cache.stop(grace=0.5)
        if wipe_after:
            wipe(config.redis.url, config.redis.key_prefix)


def make_rollout(
    prompt: Prompt,
    version: int | Sequence[int] = 0,
    *,
    num_tokens: int = 6,
    support: SupportKind = SupportKind.NONE,
    k: int = 3,
    sample_id: str | None = None,
    seed: int = 0,
) -> Rollout:
    rng = np.random.default_rng(seed)
    t = num_tokens
    versions = np.full(t, version, dtype=np.int32) if isinstance(version, int) else np.asarray(version, np.int32)
    response = rng.integers(1, VOCAB, size=t).astype(np.int32)
    support_ids = support_lps = None
    if support == SupportKind.STUDENT_TOPK:
        support_ids = rng.integers(0, VOCAB, size=(t, k)).astype(np.int32)
        support_lps = -rng.random((t, k)).astype(np.float32) * 3
    elif support == SupportKind.MC_SAMPLES:
        support_ids = rng.integers(0, VOCAB, size=(t, k)).astype(np.int32)
        support_ids[:, 0] = response
        support_lps = -rng.random((t, k)).astype(np.float32) * 3
    return Rollout(
        sample_id=sample_id or f"{prompt.ticket}/s",
        prompt_id=prompt.prompt_id,
        ticket=prompt.ticket,
        task=prompt.task,
        prompt_ids=prompt.prompt_ids,
        response_ids=response,
        behavior_logprobs=-rng.random(t).astype(np.float32),
        versions=versions,
        support_kind=support,
        support_ids=support_ids,
        support_logprobs=support_lps,
        replica="r0",
    )


def make_scores(rollout: Rollout, kt: int = 4, teacher: str = "t0", seed: int = 1) -> TeacherScores:
    rng = np.random.default_rng(seed)
    t = rollout.num_tokens
    support_lps = None
    if rollout.support_ids is not None:
        support_lps = -rng.random(rollout.support_ids.shape).astype(np.float32)
    return TeacherScores(
        sample_id=rollout.sample_id,
        token_logprobs=-rng.random(t).astype(np.float32),
        topk_ids=rng.integers(0, VOCAB, size=(t, kt)).astype(np.int32),
        topk_logprobs=-rng.random((t, kt)).astype(np.float32) * 4,
        support_logprobs=support_lps,
        teacher=teacher,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A `redis-server` of our own on a free port (for restarts and memory settings)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, password: str | None = None) -> None:
        self.exe = require_tool("redis-server")
        self.workdir = workdir
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        args += ["--maxmemory", "256mb"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.3) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
