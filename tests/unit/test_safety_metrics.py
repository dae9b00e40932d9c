"""The metrics the loss/safety alerts read (deploy/prometheus/rules/alerts.yml, group
asyncopd.safety) are recorded where the events happen: the learner counts refused acks and
failed checkpoints and stamps the time of the last one; the cache publishes the accounting gap
of its Redis snapshot (0 while produced = trained + dropped + in flight)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from asyncopd.cache.recorder import MetricsRecorder
from asyncopd.cache.store import StorePolicy, StoreStats
from asyncopd.learner.loop import LearnerLoop, LoopSettings
from asyncopd.learner.trainer import StepStats
from asyncopd.observability import metrics
from asyncopd.wire.cache_client import Batch
from batch_source_stub import StubBatchSource


def _sample(n: int) -> SimpleNamespace:
    """What the loop reads of a trained sample it does not train itself: its ticket."""
    return SimpleNamespace(rollout=SimpleNamespace(ticket=f"run-{n}"))


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self) -> str:
        return "unknown batch (the cache lost the claim)"


class Trainer:
    def __init__(self) -> None:
        self.version = 0
        self.prompt_cursor: dict[str, Any] | None = None

    def train(self, samples: list[Any]) -> list[StepStats]:
        self.version += 1
        return [StepStats(self.version, len(samples), 10, 1e-3, 0.5, {"loss": 1.0})]

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [("w", torch.zeros(2))]


class Cache(StubBatchSource):
    """A BatchSource whose acks of the batches in `refuse` are refused (FAILED_PRECONDITION)."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse

    def batch(self, n: int, size: int) -> Batch:
        return Batch(batch_id=f"b{n}", samples=[_sample(n)], staleness=[0])  # type: ignore[list-item]

    def ack_batch(self, batch_id: str) -> int:
        if batch_id in self.refuse:
            raise Refused()
        return super().ack_batch(batch_id)


def value(registry: metrics.ServiceRegistry, name: str) -> float:
    got = registry.get_sample_value(name, {"service": "learner", "replica": "l"})
    assert got is not None, name
    return got


def loop(cache: Cache, steps: int, save: Any, registry: metrics.ServiceRegistry, tmp_path: Path) -> LearnerLoop:
    return LearnerLoop(
        Trainer(),  # type: ignore[arg-type]
        cache,
        None,
        LoopSettings(steps=steps, batch_size=1, checkpoint_every=1),
        stop=threading.Event(),
        step_log=tmp_path / "steps.jsonl",
        metrics=metrics.LearnerMetrics(registry, estimator="reverse_kl_mc"),
        save_checkpoint=save,
    )


def test_refused_acks_and_checkpoints_are_counted(tmp_path: Path) -> None:
    registry = metrics.ServiceRegistry("learner", "l", process_metrics=False)
    saved: list[float] = []
    before = time.time()
    run = loop(Cache(refuse={"b2", "b3"}), 3, lambda: saved.append(time.time()), registry, tmp_path)
    assert value(registry, "asyncopd_learner_checkpoint_unixtime") == 0.0
    run.run()
    assert run.acks_refused == 2
    assert value(registry, "asyncopd_learner_acks_refused_total") == 2
    assert len(saved) == 3
    assert before <= value(registry, "asyncopd_learner_checkpoint_unixtime") <= time.time()
    assert value(registry, "asyncopd_learner_checkpoint_failures_total") == 0


def test_a_failed_checkpoint_is_counted_and_still_raised(tmp_path: Path) -> None:
    """A checkpoint failing with anything but an OSError (those wait for space: the service test
    test_learner_disk_full) propagates."""
    registry = metrics.ServiceRegistry("learner", "l", process_metrics=False)

    def broken() -> None:
        raise RuntimeError("state dict does not serialize")

    run = loop(Cache(refuse=set()), 3, broken, registry, tmp_path)
    with pytest.raises(RuntimeError, match="serialize"):
        run.run()
    # The periodic checkpoint failed, then the final one on the way out: both counted.
    assert value(registry, "asyncopd_learner_checkpoint_failures_total") == 2
    assert value(registry, "asyncopd_learner_checkpoint_unixtime") == 0.0


def stats(produced: int, trained: int, dropped: dict[str, int], in_flight: int) -> StoreStats:
    return StoreStats(
        learner_version=3,
        admitted=produced,
        produced=produced,
        trained=trained,
        dropped=dropped,
        in_flight=in_flight,
        bytes_held=0,
        byte_budget=1,
        queue_depth={},
        staleness_served={},
        evictions={},
        max_staleness=2,
        redis_errors=0,
    )


def test_the_cache_publishes_the_accounting_gap_of_its_snapshot() -> None:
    registry = metrics.ServiceRegistry("cache", "c", process_metrics=False)
    policy = StorePolicy(max_staleness=2, batch_size=4, byte_budget=1)
    recorder = MetricsRecorder(metrics.CacheMetrics(registry), policy)

    def gap() -> float | None:
        return registry.get_sample_value("asyncopd_cache_unaccounted_samples", {"service": "cache", "replica": "c"})

    recorder.refresh(stats(100, 60, {"stale": 25, "lost": 5}, 10))
    assert gap() == 0
    recorder.refresh(stats(100, 60, {"stale": 25, "lost": 5}, 7))  # three samples vanished
    assert gap() == 3
    recorder.refresh(stats(100, 62, {"stale": 25, "lost": 5}, 10))  # two counted twice
    assert gap() == -2
