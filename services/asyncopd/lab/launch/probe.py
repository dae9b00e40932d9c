"""Reading a running local pipeline from the outside: once per progress tick (cache accounting,
learner status, the learner's step log, the rollout replicas' token counters) and once at the
end (busy seconds of each pipeline stage, the cache's final accounting).

Only through the services' typed gRPC clients, their /metrics endpoints and the step log; a
service that does not answer becomes a note in the snapshot, never an error. It starts and
stops nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import grpc

from asyncopd.config.security import TLSConfig
from asyncopd.lab.launch.progress import RateMeter, Snapshot, scrape_counter, scrape_sums
from asyncopd.lab.launch.steplog import StepLogReader
from asyncopd.wire import rpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.learner_client import LearnerClient

log = logging.getLogger(__name__)


class RunProbe:
    """The launcher's view of one run: the cache and learner at `endpoints`, the step log."""

    def __init__(self, endpoints: Mapping[str, str], steps: StepLogReader, steps_total: int, tls: TLSConfig) -> None:
        self.endpoints = dict(endpoints)
        self.steps = steps
        self.steps_total = steps_total
        self.tls = tls
        self.rollout_rate, self.train_rate = RateMeter(), RateMeter()
        self._cache: CacheClient | None = None
        self._learner: LearnerClient | None = None

    def cache(self) -> CacheClient:
        if self._cache is None:
            self._cache = CacheClient(rpc.channel(self.endpoints["cache"], tls=self.tls), timeout_s=5.0)
        return self._cache

    def learner(self) -> LearnerClient:
        if self._learner is None:
            self._learner = LearnerClient(rpc.channel(self.endpoints["learner"], tls=self.tls), timeout_s=5.0)
        return self._learner

    def tick(
        self, started: float, metrics_urls: Mapping[str, str], accuracy_before: float | None
    ) -> tuple[Snapshot, bool]:
        """One progress tick; returns (snapshot, learner finished)."""
        snap = Snapshot(elapsed_s=time.monotonic() - started, steps_total=self.steps_total)
        finished = False
        try:
            snap.cache = self.cache().stats()
            snap.version = int(snap.cache.get("learner_version", 0))
        except grpc.RpcError as err:
            snap.notes.append(f"cache stats: {err.code().name}")  # type: ignore[attr-defined]
        try:
            status = self.learner().status()
            snap.learner = {"version": status.version, "finished": status.finished, "loss": status.last_loss}
            snap.version = max(snap.version, int(status.version))
            finished = bool(status.finished) or status.version >= self.steps_total
        except grpc.RpcError as err:
            snap.notes.append(f"learner status: {err.code().name}")  # type: ignore[attr-defined]
        self._read_step_log(snap, accuracy_before)
        self._read_rollout_tokens(snap, metrics_urls)
        return snap, finished

    def _read_step_log(self, snap: Snapshot, accuracy_before: float | None) -> None:
        self.steps.poll()
        records = self.steps.records
        train = [r for r in records if r.is_step]
        if train:
            snap.last_step = train[-1]
            snap.version = max(snap.version, train[-1].version)
            tokens = sum(r.tokens or 0 for r in train)
            snap.train_tokens_per_s = self.train_rate.update(float(tokens))
        accs = [r.accuracy for r in records if r.accuracy is not None]
        snap.last_accuracy = accs[-1] if accs else accuracy_before

    def _read_rollout_tokens(self, snap: Snapshot, metrics_urls: Mapping[str, str]) -> None:
        rollout_total = 0.0
        seen = False
        for name, url in metrics_urls.items():
            if name.startswith("rollout-"):
                value = scrape_counter(url, "asyncopd_rollout_generated_tokens")
                if value is not None:
                    rollout_total += value
                    seen = True
        if seen:
            snap.rollout_tokens_per_s = self.rollout_rate.update(rollout_total)

    def busy_seconds(self, metrics_urls: Mapping[str, str]) -> dict[str, float]:
        """Busy seconds of each pipeline stage, summed over replicas (from their /metrics)."""
        stages: dict[str, float] = {}
        for name, url in metrics_urls.items():
            if name.startswith("rollout-"):
                found = scrape_sums(url, "asyncopd_rollout_generation_seconds")
                if found:
                    stages["rollout"] = stages.get("rollout", 0.0) + sum(found.values())
            elif name.startswith("teacher-"):
                found = scrape_sums(url, "asyncopd_teacher_scoring_seconds")
                if found:
                    stages["teacher"] = stages.get("teacher", 0.0) + sum(found.values())
            elif name == "learner":
                found = scrape_sums(url, "asyncopd_learner_step_phase_seconds", by="phase")
                for phase, seconds in (found or {}).items():
                    stages[f"learner_{phase}"] = seconds
        return {k: round(v, 3) for k, v in stages.items()}

    def final_stats(self) -> dict[str, Any] | None:
        """The cache's accounting now (None, logged, when it does not answer)."""
        try:
            return self.cache().stats()
        except grpc.RpcError as err:
            log.warning("final cache stats unavailable: %s", err)
            return None
