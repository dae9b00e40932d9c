"""The scaling decision for rollout replicas: pure, clock passed in, no I/O.

Knows two pressures, each a fraction of the recent window in [0, 1]: how much the learner
waited for data (more rollouts would help) and how much admission control blocked rollouts
(rollouts are ahead of the learner; fewer would do). It knows nothing of Kubernetes, gRPC or
where the fractions come from (see `signals.py`).

Damping, so a noisy pipeline does not make the Deployment flap:
- thresholds: a pressure counts only at or above its threshold;
- hysteresis: a pressure must hold for `sustain` consecutive observations before acting, and
  any observation without it (or with both pressures at once) resets the streak;
- cooldowns: after any change, wait `cooldown_up_s` before adding and `cooldown_down_s` before
  removing replicas (scale-down is usually slower: new replicas cost a model load);
- bounds: never below `min_replicas` or above `max_replicas`; a count outside the bounds (a
  manual `kubectl scale`) is brought back at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyParams:
    """Bounds and damping of the policy (mirrors `asyncopd.config.autoscaler.AutoscalerConfig`)."""

    min_replicas: int
    max_replicas: int
    scale_up_threshold: float
    scale_down_threshold: float
    sustain: int = 1
    cooldown_up_s: float = 0.0
    cooldown_down_s: float = 0.0
    step_up: int = 1
    step_down: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        for name in ("scale_up_threshold", "scale_down_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.sustain < 1 or self.step_up < 1 or self.step_down < 1:
            raise ValueError("sustain, step_up and step_down must be >= 1")
        if self.cooldown_up_s < 0 or self.cooldown_down_s < 0:
            raise ValueError("cooldowns must be >= 0")


@dataclass(frozen=True)
class Observation:
    """One look at the pipeline: the replicas running now and the two pressures."""

    now: float  # seconds on a monotonic clock
    replicas: int  # the Deployment's current spec.replicas (may have been changed by hand)
    learner_wait: float  # fraction of the window the learner waited for data, in [0, 1]
    admission_blocked: float  # fraction of the window admission blocked rollouts, in [0, 1]


@dataclass(frozen=True)
class Decision:
    """What to do: `replicas` is the wanted count (equal to the observed one when holding)."""

    replicas: int
    reason: str  # human-readable, for logs
    kind: str = "steady"  # learner_starved | admission_blocked | bounds | steady (metric label)

    def changes(self, observed: int) -> bool:
        return self.replicas != observed


class ScalingPolicy:
    """Stateful (streaks and the time of the last change) but deterministic and I/O-free."""

    def __init__(self, params: PolicyParams) -> None:
        self.params = params
        self._up_streak = 0
        self._down_streak = 0
        self._last_change = -math.inf

    def decide(self, obs: Observation) -> Decision:
        p = self.params
        for name in ("learner_wait", "admission_blocked"):
            value = getattr(obs, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
        if obs.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {obs.replicas}")

        if obs.replicas < p.min_replicas or obs.replicas > p.max_replicas:
            target = min(max(obs.replicas, p.min_replicas), p.max_replicas)
            return self._change(obs, target, f"outside bounds [{p.min_replicas}, {p.max_replicas}]", "bounds")

        wants_up = obs.learner_wait >= p.scale_up_threshold
        wants_down = obs.admission_blocked >= p.scale_down_threshold
        if wants_up == wants_down:
            self._up_streak = self._down_streak = 0
            why = "conflicting signals" if wants_up else "no pressure"
            return Decision(obs.replicas, why)

        if wants_up:
            self._up_streak += 1
            self._down_streak = 0
            if self._up_streak < p.sustain:
                return Decision(obs.replicas, f"learner waiting ({self._up_streak}/{p.sustain})")
            if obs.replicas >= p.max_replicas:
                return Decision(obs.replicas, "learner waiting, at max_replicas")
            if obs.now - self._last_change < p.cooldown_up_s:
                return Decision(obs.replicas, "learner waiting, in scale-up cooldown")
            target = min(obs.replicas + p.step_up, p.max_replicas)
            return self._change(obs, target, "learner waiting for data", "learner_starved")

        self._down_streak += 1
        self._up_streak = 0
        if self._down_streak < p.sustain:
            return Decision(obs.replicas, f"admission blocking ({self._down_streak}/{p.sustain})")
        if obs.replicas <= p.min_replicas:
            return Decision(obs.replicas, "admission blocking, at min_replicas")
        if obs.now - self._last_change < p.cooldown_down_s:
            return Decision(obs.replicas, "admission blocking, in scale-down cooldown")
        target = max(obs.replicas - p.step_down, p.min_replicas)
        return self._change(obs, target, "admission blocking rollouts", "admission_blocked")

    def _change(self, obs: Observation, target: int, reason: str, kind: str) -> Decision:
        self._up_streak = self._down_streak = 0
        self._last_change = obs.now
        return Decision(target, reason, kind)
