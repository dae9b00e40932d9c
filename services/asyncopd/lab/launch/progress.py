"""Live progress of a local run: what is polled each tick and how it is shown (rich).

A `Snapshot` is the plain state of the pipeline at one moment (cache accounting, learner
status, latest step record, rates); `progress_table` renders it. Rates come from `RateMeter`
over successive counter readings, e.g. the rollout replicas' generated-token counters scraped
from their Prometheus endpoints. It knows nothing about how the numbers are produced.
"""

from __future__ import annotations

import time
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from asyncopd.lab.launch.steplog import StepRecord


class RateMeter:
    """Rate of a monotonically growing counter over a sliding window of readings."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._readings: deque[tuple[float, float]] = deque()

    def update(self, total: float, now: float | None = None) -> float | None:
        """Record `total` at `now`; returns units/s over the window (None until two readings)."""
        now = time.monotonic() if now is None else now
        self._readings.append((now, total))
        while len(self._readings) > 2 and now - self._readings[0][0] > self.window_s:
            self._readings.popleft()
        (t0, v0), (t1, v1) = self._readings[0], self._readings[-1]
        if t1 <= t0:
            return None
        return max(0.0, (v1 - v0) / (t1 - t0))


def _fetch(url: str, timeout_s: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode("utf-8", errors="replace"))
    except OSError:
        return None


def scrape_counter(url: str, metric: str, timeout_s: float = 1.0) -> float | None:
    """Sum of every sample of counter `metric` (name without `_total`) at a /metrics URL."""
    text = _fetch(url, timeout_s)
    if text is None:
        return None
    total = None
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name in (metric, metric + "_total"):
                total = (total or 0.0) + float(sample.value)
    return total


def scrape_sums(url: str, metric: str, by: str | None = None, timeout_s: float = 2.0) -> dict[str, float] | None:
    """`<metric>_sum` of a histogram at a /metrics URL, summed per value of label `by`
    (one entry '' when `by` is None); None when the endpoint does not answer."""
    text = _fetch(url, timeout_s)
    if text is None:
        return None
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == metric + "_sum":
                key = sample.labels.get(by, "") if by is not None else ""
                sums[key] = sums.get(key, 0.0) + float(sample.value)
    return sums


@dataclass
class Snapshot:
    """The pipeline at one moment, as plain values."""

    elapsed_s: float
    steps_total: int
    version: int = 0
    cache: Mapping[str, Any] | None = None
    learner: Mapping[str, Any] | None = None
    last_step: StepRecord | None = None
    last_accuracy: float | None = None
    rollout_tokens_per_s: float | None = None
    train_tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def progress_table(snap: Snapshot) -> Table:
    """A compact live table of the run."""
    table = Table(show_header=False, title=f"asyncopd run — {snap.elapsed_s:.0f}s", expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    pct = 100.0 * snap.version / snap.steps_total if snap.steps_total else 0.0
    table.add_row("step", f"{snap.version}/{snap.steps_total} ({pct:.0f}%)")
    last = snap.last_step
    if last is not None:
        smax = "-" if last.staleness_max is None else str(last.staleness_max)
        stale = f"mean {_f(last.staleness_mean, '{:.2f}')}, max {smax}"
        table.add_row("batch staleness", stale)
        table.add_row("loss / KL", f"{_f(last.loss, '{:.4f}')} / {_f(last.kl, '{:.4f}')}")
    table.add_row("rollout tokens/s", _f(snap.rollout_tokens_per_s))
    table.add_row("train tokens/s", _f(snap.train_tokens_per_s))
    cache = snap.cache
    if cache is not None:
        depths = cache.get("queue_depth") or {}
        table.add_row("queues", ", ".join(f"{k} {v}" for k, v in sorted(depths.items())) or "-")
        dropped = sum(int(v) for v in (cache.get("dropped") or {}).values())
        table.add_row(
            "samples",
            f"produced {cache.get('produced', 0)}, trained {cache.get('trained', 0)}, "
            f"dropped {dropped}, in flight {cache.get('in_flight', 0)}",
        )
    table.add_row("accuracy (latest eval)", _f(snap.last_accuracy, "{:.3f}"))
    for note in snap.notes:
        table.add_row("note", note)
    return table
