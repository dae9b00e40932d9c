"""One autoscaler tick: read the pipeline, decide, patch the Deployment's scale.

Composes the pure parts (`SignalWindow`, `ScalingPolicy`) with whatever reads the cache's
stats, the learner's status and the Deployment's scale; those come in through the
constructor, so tests can drive ticks with a stand-in API server and recorded stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from asyncopd.autoscaler.policy import Decision, Observation, ScalingPolicy
from asyncopd.autoscaler.signals import SignalWindow

log = logging.getLogger(__name__)


class ReplicaCount(Protocol):
    """Read and set the replicas of the rollout Deployment (see `kube.DeploymentScale`)."""

    def get(self) -> int: ...

    def set(self, replicas: int) -> int: ...


class DecisionSink(Protocol):
    """Where decisions are recorded (the autoscaler's Prometheus metrics)."""

    def record(self, decision: Decision) -> None: ...


class Controller:
    """Observes, decides and (unless `dry_run`) applies; one `tick()` per interval."""

    def __init__(
        self,
        policy: ScalingPolicy,
        window: SignalWindow,
        scale: ReplicaCount,
        *,
        read_stats: Callable[[], Mapping[str, Any]],
        read_status: Callable[[], Any],
        sink: DecisionSink | None = None,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.window = window
        self.scale = scale
        self._read_stats = read_stats
        self._read_status = read_status
        self._sink = sink
        self.dry_run = dry_run
        self._clock = clock

    def tick(self) -> Decision:
        pressures = self.window.observe(self._read_stats(), self._read_status())
        current = self.scale.get()
        decision = self.policy.decide(
            Observation(
                now=self._clock(),
                replicas=current,
                learner_wait=pressures.learner_wait,
                admission_blocked=pressures.admission_blocked,
            )
        )
        if decision.changes(current):
            log.info(
                "scale rollout %d -> %d: %s (learner_wait=%.2f admission_blocked=%.2f ready=%d)%s",
                current,
                decision.replicas,
                decision.reason,
                pressures.learner_wait,
                pressures.admission_blocked,
                pressures.ready_samples,
                " [dry run]" if self.dry_run else "",
            )
            if not self.dry_run:
                self.scale.set(decision.replicas)
        if self._sink is not None:
            self._sink.record(decision)
        return decision
