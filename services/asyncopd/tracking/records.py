"""Step record -> named scalars and histograms (what every tracking backend writes).

A step record (`event: step`, written by `asyncopd.learner.loop`) carries the loss and the
estimator's metrics (kl, ratio_mean, ratio_max, clipped_fraction, ...), lr, grad_norm, batch
size and tokens, staleness mean/max and histogram, phase times (`seconds`) and the weight
broadcast; an `event: eval` record carries the evaluation's accuracy. Names are grouped by a
prefix (`train/`, `staleness/`, `time/`, `sync/`, `eval/`) so dashboards group them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Step-record fields that are bookkeeping, not measurements.
_NOT_SCALARS = frozenset({"event", "version", "version_before", "time_unix", "sample_ids"})


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one step or eval record, by tracking name (empty for other events)."""
    event = record.get("event")
    out: dict[str, float] = {}
    if event == "eval":
        for key, value in record.items():
            number = _number(value)
            if number is not None and key not in _NOT_SCALARS:
                out[f"eval/{key}"] = number
        return out
    if event != "step":
        return out
    for key, value in record.items():
        if key in _NOT_SCALARS:
            continue
        if key.startswith("staleness_"):
            number = _number(value)
            if number is not None:
                out[f"staleness/{key.removeprefix('staleness_')}"] = number
            continue
        if key == "seconds" and isinstance(value, Mapping):
            out.update({f"time/{phase}": float(v) for phase, v in value.items() if _number(v) is not None})
            continue
        if key == "broadcast" and isinstance(value, Mapping):
            out.update({f"sync/{k}": float(v) for k, v in value.items() if _number(v) is not None})
            continue
        number = _number(value)
        if number is not None:
            out[f"train/{key}"] = number
    return out


def histograms_of(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """Value lists of a step record: the staleness of every trained sample (from its
    `staleness_hist` {staleness: count})."""
    hist = record.get("staleness_hist") if record.get("event") == "step" else None
    if not isinstance(hist, Mapping) or not hist:
        return {}
    values = [float(s) for s, count in sorted(hist.items(), key=lambda kv: int(kv[0])) for _ in range(int(count))]
    return {"staleness/samples": values}
