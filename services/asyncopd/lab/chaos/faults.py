"""The faults `asyncopd chaos` can inject, and the schedule they are injected on.

A fault is named by its kind, the learner version at which it fires, and (optionally) its
target child, e.g. `kill-rollout@12:rollout-1`. Kinds:

  kill-rollout    SIGKILL a rollout replica's process group while it generates; restarted after
                  `restart_after_s` (0 = never: a later `start-rollout` adds capacity back)
  start-rollout   start one more rollout replica mid-run
  kill-teacher    SIGKILL a teacher while it holds claimed rollouts; restarted after a pause
  kill-cache      SIGKILL the cache service; restarted on the same port after a pause
  restart-redis   SIGKILL Redis and restart it from its fsync-always append-only file (nothing lost)
  wipe-redis      Redis restarts empty (as without persistence): the accounting is snapshotted
                  with writes paused, then Redis is killed, its files deleted and restarted
  kill-learner    SIGKILL the learner; restarted, it resumes from its newest checkpoint
  freeze-rollout  SIGSTOP a rollout replica for `hold_s` (longer than the weight-sync timeout), so
                  it stops answering in the middle of weight broadcasts; then SIGCONT

Parsing and the default schedule are pure; `asyncopd.lab.chaos.injector` carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = (
    "kill-rollout",
    "start-rollout",
    "kill-teacher",
    "kill-cache",
    "restart-redis",
    "wipe-redis",
    "kill-learner",
    "freeze-rollout",
)
# Kinds whose target is a child of that service (the first live one unless named).
TARGET_PREFIX = {"kill-rollout": "rollout-", "freeze-rollout": "rollout-", "kill-teacher": "teacher-"}


@dataclass(frozen=True)
class FaultSpec:
    """One fault: what, when (learner version), to whom, and how long until recovery."""

    kind: str
    at_version: int
    target: str | None = None
    restart_after_s: float = 2.0
    hold_s: float | None = None  # freeze-rollout; None = 2 x weightsync.timeout_s + 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.at_version < 1:
            raise ValueError(f"{self.kind}: at_version must be >= 1, got {self.at_version}")
        if (
            self.target is not None
            and self.kind in TARGET_PREFIX
            and not self.target.startswith(TARGET_PREFIX[self.kind])
        ):
            raise ValueError(f"{self.kind}: target must be a {TARGET_PREFIX[self.kind]}N child, got {self.target!r}")

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.at_version}" + (f":{self.target}" if self.target else "")


def parse_fault(text: str) -> FaultSpec:
    """`kind@version[:target]`, e.g. `kill-teacher@20` or `kill-rollout@8:rollout-1`."""
    head, _, target = text.strip().partition(":")
    kind, sep, version = head.partition("@")
    if not sep or not version.strip().isdigit():
        raise ValueError(f"fault {text!r}: write it as kind@version[:target], e.g. kill-teacher@20")
    return FaultSpec(kind.strip(), int(version), target.strip() or None)


def parse_schedule(text: str) -> list[FaultSpec]:
    """A comma-separated list of faults, sorted by version."""
    faults = [parse_fault(item) for item in text.split(",") if item.strip()]
    if not faults:
        raise ValueError("the fault schedule is empty")
    return sorted(faults, key=lambda f: f.at_version)


def default_schedule(steps: int) -> list[FaultSpec]:
    """Every fault kind once (rollout kills three times), spread over 5%..70% of the run.

    The last 30% leaves room for faults that fire late (one fault at a time, each waiting for
    the previous recovery) and for the learner to show progress after the last recovery.
    """
    plan: list[tuple[str, str | None, float]] = [
        ("kill-rollout", "rollout-0", 2.0),
        ("kill-rollout", "rollout-1", 0.0),  # not restarted: the next fault adds a fresh replica
        ("start-rollout", None, 0.0),
        ("kill-teacher", None, 2.0),
        ("kill-cache", None, 2.0),
        ("restart-redis", None, 1.0),
        ("kill-rollout", "rollout-0", 2.0),
        ("wipe-redis", None, 1.0),
        ("kill-learner", None, 1.0),
        ("freeze-rollout", "rollout-0", 0.0),
    ]
    if steps < 4 * len(plan):
        raise ValueError(f"the default fault schedule needs at least {4 * len(plan)} learner steps, got {steps}")
    first, last = 0.05 * steps, 0.7 * steps
    gap = (last - first) / (len(plan) - 1)
    return [
        FaultSpec(kind, max(1, round(first + i * gap)), target, restart_after_s=delay)
        for i, (kind, target, delay) in enumerate(plan)
    ]
