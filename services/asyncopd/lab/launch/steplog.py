"""Reading the learner's per-step JSONL log into uniform records for progress, report and plots.

The learner appends one JSON object per optimizer step (and may add evaluation lines). This
module maps the keys it finds onto `StepRecord`, accepting the few spellings a training log
naturally uses, so the launcher does not break when the learner adds fields. A line that is
not complete JSON (the learner is mid-write) is left for the next read.

It knows the log's shape; nothing about how the learner computes any of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Accepted key spellings, first match wins.
_KEYS: dict[str, tuple[str, ...]] = {
    "version": ("version", "step"),
    "time": ("time", "time_unix", "timestamp", "ts", "unix_time"),
    "elapsed_s": ("elapsed_s", "wall_s", "elapsed"),
    "loss": ("loss",),
    "kl": ("kl", "kl_estimate", "kl_mean"),
    "samples": ("samples", "batch_size", "num_samples"),
    "tokens": ("tokens", "train_tokens", "num_tokens", "response_tokens"),
    "staleness_mean": ("staleness_mean", "mean_staleness"),
    "staleness_max": ("staleness_max", "max_staleness"),
    "accuracy": ("accuracy", "eval_accuracy", "test_accuracy"),
    "tokens_per_second": ("tokens_per_second", "train_tokens_per_second"),
}


@dataclass(frozen=True)
class StepRecord:
    """One line of the learner's log: a training step, an evaluation, or both."""

    version: int
    time: float | None = None
    elapsed_s: float | None = None
    loss: float | None = None
    kl: float | None = None
    samples: int | None = None
    tokens: int | None = None
    staleness_mean: float | None = None
    staleness_max: int | None = None
    accuracy: float | None = None
    tokens_per_second: float | None = None
    # Samples of the step's batch by staleness (versions): {staleness: count}.
    staleness_hist: Mapping[int, int] | None = None

    @property
    def is_step(self) -> bool:
        """A training step (as opposed to an evaluation-only line)."""
        return self.loss is not None or self.tokens is not None or self.samples is not None


def _first(raw: Mapping[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        value = raw.get(name)
        if value is not None:
            return value
    return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def record_from_dict(raw: Mapping[str, Any]) -> StepRecord | None:
    """A StepRecord from one decoded log line, or None when it carries no version."""
    version = _num(_first(raw, _KEYS["version"]))
    if version is None:
        return None
    staleness = raw.get("staleness")
    smean = _num(_first(raw, _KEYS["staleness_mean"]))
    smax = _num(_first(raw, _KEYS["staleness_max"]))
    if isinstance(staleness, list) and staleness and all(isinstance(s, int | float) for s in staleness):
        smean = smean if smean is not None else float(sum(staleness)) / len(staleness)
        smax = smax if smax is not None else float(max(staleness))
    evaluation = raw.get("eval")
    accuracy = _num(_first(raw, _KEYS["accuracy"]))
    if accuracy is None and isinstance(evaluation, Mapping):
        accuracy = _num(evaluation.get("accuracy"))

    def as_int(key: str) -> int | None:
        value = _num(_first(raw, _KEYS[key]))
        return None if value is None else int(value)

    def as_float(key: str) -> float | None:
        return _num(_first(raw, _KEYS[key]))

    hist: dict[int, int] | None = None
    raw_hist = raw.get("staleness_hist")
    if isinstance(raw_hist, Mapping):
        try:
            hist = {int(k): int(v) for k, v in raw_hist.items() if int(v) > 0}
        except (TypeError, ValueError):
            hist = None
    elif isinstance(staleness, list) and staleness and all(isinstance(s, int) for s in staleness):
        hist = {}
        for s in staleness:
            hist[s] = hist.get(s, 0) + 1

    return StepRecord(
        version=int(version),
        time=as_float("time"),
        elapsed_s=as_float("elapsed_s"),
        loss=as_float("loss"),
        kl=as_float("kl"),
        samples=as_int("samples"),
        tokens=as_int("tokens"),
        staleness_mean=smean,
        staleness_max=None if smax is None else int(smax),
        accuracy=accuracy,
        tokens_per_second=as_float("tokens_per_second"),
        staleness_hist=hist or None,
    )


class StepLogReader:
    """Incremental reader of a growing JSONL file: `poll()` returns the records added since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.records: list[StepRecord] = []

    def poll(self) -> list[StepRecord]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        new: list[StepRecord] = []
        consumed = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # partial line: the writer is mid-write
            consumed += len(line)
            text = line.strip()
            if not text:
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(raw, dict):
                rec = record_from_dict(raw)
                if rec is not None:
                    new.append(rec)
        self._offset += consumed
        self.records.extend(new)
        return new


def read_step_log(path: Path) -> list[StepRecord]:
    """Every complete record in a step log (empty if the file does not exist)."""
    reader = StepLogReader(path)
    reader.poll()
    return reader.records
