"""The learner loop against a cache that fails the ways a real one does: unreachable for a
while (UNAVAILABLE), a claim it no longer knows (FAILED_PRECONDITION on ack), and a published
version ahead of a learner restarted from an older checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from asyncopd.cache.policy import StalenessPolicy
from asyncopd.learner.loop import LearnerLoop, LoopSettings
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from asyncopd.records import ScoredSample
from asyncopd.wire.cache_client import Batch, LearnerStart
from batch_source_stub import StubBatchSource
from test_learner_step import generate, load, scored_samples
from tiny_models import make_tiny_qwen3

pytestmark = pytest.mark.service


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FlakyCache(StubBatchSource):
    """A BatchSource whose calls fail as scripted: `failures[method]` is a list of codes to raise first."""

    def __init__(self, samples: list[ScoredSample], published: int, failures: dict[str, list[grpc.StatusCode]]):
        super().__init__(published)
        self.samples = samples
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        pending = self.failures.get(method, [])
        if pending:
            raise RpcFailure(pending.pop(0), f"scripted {method} failure")

    def begin_learner(self, learner: str = "learner", checkpoint_version: int | None = None, cursor: Any = None) -> Any:
        self._maybe_fail("begin_learner")
        start = StalenessPolicy(max_staleness=1, batch_size=4).start_version(self.published, checkpoint_version, False)
        return LearnerStart(1, self.published, start, 0)

    def batch(self, n: int, size: int) -> Batch:
        return Batch(batch_id=f"b{n}", samples=self.samples[:size], staleness=[0] * size)

    def pull_batch(
        self, size: int, learner_version: int, wait_ms: int = 0, learner: str = "learner", keep: Any = ()
    ) -> Any:
        self._maybe_fail("pull_batch")
        return super().pull_batch(size, learner_version, wait_ms, learner, keep)

    def ack_batch(self, batch_id: str) -> int:
        self._maybe_fail("ack_batch")
        return super().ack_batch(batch_id)

    def publish_version(self, version: int, finished: bool = False) -> int:
        self._maybe_fail("publish_version")
        if version < self.published:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"version {version} is behind {self.published}")
        return super().publish_version(version, finished)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ScoredSample]]:
    root = tmp_path_factory.mktemp("models")
    student = make_tiny_qwen3(root / "student", seed=1)
    teacher = make_tiny_qwen3(root / "teacher", seed=2, scale=4.0)
    return student, scored_samples(generate(load(student), load(teacher), n=4), "reverse_kl_mc")


def run_loop(student: Path, cache: FlakyCache, steps: int, log: Path) -> LearnerLoop:
    trainer = Trainer(load(student), OPDLoss("reverse_kl_mc", correction="is"), lr=1e-3, micro_batch_size=4)
    settings = LoopSettings(steps=steps, batch_size=4, log_sample_ids=True, max_retry_delay_s=0.05)
    loop = LearnerLoop(trainer, cache, None, settings, stop=threading.Event(), step_log=log)
    assert loop.progress() is None, "Status has nothing to report before the first delivered version"
    loop.run()
    progress = loop.progress()
    assert progress is not None and progress.version == cache.published, "Status = the last delivered version"
    return loop


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_rides_through_an_unreachable_cache_and_a_refused_ack(
    samples: tuple[Path, list[ScoredSample]], tmp_path: Path
) -> None:
    student, batch = samples
    unavailable = [grpc.StatusCode.UNAVAILABLE] * 3
    cache = FlakyCache(
        batch,
        published=0,
        failures={
            "pull_batch": list(unavailable),
            "publish_version": [grpc.StatusCode.DEADLINE_EXCEEDED],
            "ack_batch": [grpc.StatusCode.FAILED_PRECONDITION],
        },
    )
    loop = run_loop(student, cache, steps=3, log=tmp_path / "steps.jsonl")
    assert loop.trainer.version == 3 and loop.finished
    assert loop.cache_retries == 4  # three pulls and one publish retried
    assert loop.acks_refused == 1 and cache.acked == ["b2", "b3"]
    assert cache.versions == [0, 1, 2, 3, 3]  # start, each step, finished
    steps = [r for r in records(tmp_path / "steps.jsonl") if r["event"] == "step"]
    assert [len(r["sample_ids"]) for r in steps] == [4, 4, 4]


def test_a_learner_behind_the_published_version_jumps_past_the_bound(
    samples: tuple[Path, list[ScoredSample]], tmp_path: Path
) -> None:
    """Published 7, max_staleness 1: replicas may hold tokens of version 8; the learner starts at
    7 + 1 + 2 = 10 (tokens of 8 are then 2 > 1 versions old), and publishes the jump before it
    pushes weights (replicas take at most published + 1)."""
    student, batch = samples
    cache = FlakyCache(batch, published=7, failures={})
    loop = run_loop(student, cache, steps=12, log=tmp_path / "steps.jsonl")
    assert loop.trainer.version == 12
    assert cache.versions == [10, 10, 11, 12, 12], "versions never went back"
    start = records(tmp_path / "steps.jsonl")[0]
    assert start["event"] == "start" and start["version"] == 10 and start["published_version"] == 7
    assert start["version_jump"] == 10


def test_other_errors_are_not_retried(samples: tuple[Path, list[ScoredSample]], tmp_path: Path) -> None:
    student, batch = samples
    cache = FlakyCache(batch, published=0, failures={"pull_batch": [grpc.StatusCode.INVALID_ARGUMENT]})
    with pytest.raises(grpc.RpcError):
        run_loop(student, cache, steps=2, log=tmp_path / "steps.jsonl")
    assert cache.calls["pull_batch"] == 1
