"""Turning the cache's Stats and the learner's Status into the policy's two pressures.

Pure: it is handed the already-fetched stats (the mapping `CacheClient.stats()` returns) and
learner status (any object or mapping with `finished`), and keeps a short window of what it
saw. It knows nothing of gRPC or Kubernetes.

Per observation:
- the learner *waits for data* when fewer scored samples are ready than one learner batch
  (its next PullBatch has to block);
- admission *blocks rollouts* when the cache refused prompts since the previous observation
  (its `admission_blocked` counter grew: an AcquirePrompts got fewer than it asked for), or,
  from the state alone, when the ready samples already fill the staleness window (the cache
  reports it in Stats as `staleness_window`, computed by its policy; it is not re-derived
  here) or the byte budget is (nearly) full: either way the cache admits nothing new.
A finished run (the learner's Status or the cache's `finished`) exerts no pressure. The
pressures are the fractions of the last `window` observations in which each held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The byte budget counts as full a little before 100 %: eviction starts there.
BUDGET_FULL_FRACTION = 0.95


@dataclass(frozen=True)
class Pressures:
    """Fractions in [0, 1] of the recent window; see the module docstring."""

    learner_wait: float
    admission_blocked: float
    ready_samples: int


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


class SignalWindow:
    """Keeps the last `window` boolean observations of each pressure."""

    def __init__(self, batch_size: int, window: int = 4) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
        self.batch_size = batch_size
        self._waits: deque[bool] = deque(maxlen=window)
        self._blocks: deque[bool] = deque(maxlen=window)
        self._refusals: int | None = None  # the cache's admission_blocked counter last seen

    def observe(self, cache_stats: Mapping[str, Any], learner_status: Any) -> Pressures:
        queue = cache_stats.get("queue_depth") or {}
        ready = int(queue.get("scored", 0))
        staleness_window = int(cache_stats.get("staleness_window", 0))
        if staleness_window < 1:
            raise ValueError(
                f"the cache's Stats report no staleness_window (got {staleness_window}): the cache predates "
                "that field; run a cache of the autoscaler's version"
            )
        budget = int(cache_stats.get("byte_budget", 0))
        held = int(cache_stats.get("bytes_held", 0))
        finished = bool(_get(learner_status, "finished", False)) or bool(cache_stats.get("finished", False))
        refusals = (cache_stats.get("counters") or {}).get("admission_blocked")
        # A counter that went down means Redis lost its state (a reset): no delta this time.
        refused = refusals is not None and self._refusals is not None and refusals > self._refusals
        self._refusals = None if refusals is None else int(refusals)

        waiting = not finished and ready < self.batch_size
        budget_full = budget > 0 and held >= BUDGET_FULL_FRACTION * budget
        at_capacity = ready >= staleness_window or budget_full
        blocked = not finished and (refused or at_capacity)
        self._waits.append(waiting)
        self._blocks.append(blocked)
        return Pressures(
            learner_wait=sum(self._waits) / len(self._waits),
            admission_blocked=sum(self._blocks) / len(self._blocks),
            ready_samples=ready,
        )
