"""PNG plots of a run from its step records: accuracy and KL vs step and vs wall time,
training throughput, and staleness (per step and the served histogram).

Matplotlib with the Agg backend (no display needed). Pure in the sense that it only reads the
records it is given and writes files; it knows nothing about the services.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from asyncopd.lab.launch.steplog import StepRecord


def wall_times(records: Sequence[StepRecord], t0: float | None = None) -> list[float | None]:
    """Seconds since the run's start for each record (from `elapsed_s`, else `time - t0`).

    A record without a clock (an evaluation line) takes the time of the record before it: the
    learner writes an evaluation right after the step it evaluates.
    """
    if t0 is None:
        t0 = _t0(records)
    out: list[float | None] = []
    previous: float | None = None
    for r in records:
        if r.elapsed_s is not None:
            previous = r.elapsed_s
        elif r.time is not None and t0 is not None:
            previous = r.time - t0
        out.append(previous)
    return out


def throughput_series(records: Sequence[StepRecord], t0: float | None = None) -> tuple[list[int], list[float]]:
    """(versions, train tokens/s) per step: the logged rate, else tokens over the time since the last step."""
    steps = [r for r in records if r.is_step]
    times = wall_times(steps, t0)
    xs: list[int] = []
    ys: list[float] = []
    prev: float | None = None
    for rec, t in zip(steps, times, strict=True):
        if rec.tokens_per_second is not None:
            xs.append(rec.version)
            ys.append(rec.tokens_per_second)
        elif rec.tokens is not None and t is not None and prev is not None and t > prev:
            xs.append(rec.version)
            ys.append(rec.tokens / (t - prev))
        prev = t if t is not None else prev
    return xs, ys


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pairs(
    records: Sequence[StepRecord], times: Sequence[float | None], attr: str
) -> tuple[list[int], list[float], list[float]]:
    xs, ts, ys = [], [], []
    for rec, t in zip(records, times, strict=True):
        value = getattr(rec, attr)
        if value is None:
            continue
        xs.append(rec.version)
        ys.append(float(value))
        ts.append(float("nan") if t is None else t)
    return xs, ts, ys


def _vs_step_and_time(path: Path, title: str, ylabel: str, *, xs: list[int], ts: list[float], ys: list[float]) -> Path:
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    ax_step.plot(xs, ys, marker="o", markersize=3)
    ax_step.set_xlabel("learner version (optimizer steps)")
    ax_time.plot(ts, ys, marker="o", markersize=3)
    ax_time.set_xlabel("wall time (s)")
    for ax in (ax_step, ax_time):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    records: Sequence[StepRecord],
    out_dir: Path,
    staleness_histogram: Mapping[int, int] | None = None,
    t0: float | None = None,
    accuracy_points: Sequence[tuple[int, float, float]] = (),
) -> list[Path]:
    """Write the run's PNGs into `out_dir`; returns their paths.

    `accuracy_points` adds (version, wall seconds, accuracy) evaluations done outside the
    learner (the launcher's before/after evaluations).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    times = wall_times(records, t0)
    written: list[Path] = []

    xs, ts, ys = _pairs(records, times, "accuracy")
    points = sorted([*zip(xs, ts, ys, strict=True), *accuracy_points])
    written.append(
        _vs_step_and_time(
            out_dir / "accuracy.png",
            "greedy test accuracy",
            "accuracy",
            xs=[p[0] for p in points],
            ts=[p[1] for p in points],
            ys=[p[2] for p in points],
        )
    )

    steps = [r for r in records if r.is_step]
    step_times = wall_times(steps, t0 if t0 is not None else _t0(records))
    xs, ts, ys = _pairs(steps, step_times, "kl")
    written.append(_vs_step_and_time(out_dir / "kl.png", "KL estimate per step", "KL", xs=xs, ts=ts, ys=ys))

    tx, ty = throughput_series(records, t0 if t0 is not None else _t0(records))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tx, ty, alpha=0.35, label="per step")
    ax.plot(tx, moving_average(ty, 10), label="mean of 10 steps")
    ax.legend()
    ax.set_xlabel("learner version (optimizer steps)")
    ax.set_ylabel("train tokens / s")
    ax.set_title("training throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "throughput.png")

    fig, (ax_steps, ax_hist) = plt.subplots(1, 2, figsize=(10, 4))
    mx, _, mean = _pairs(steps, step_times, "staleness_mean")
    xx, _, smax = _pairs(steps, step_times, "staleness_max")
    ax_steps.plot(mx, mean, label="mean", marker="o", markersize=3)
    ax_steps.plot(xx, smax, label="max", marker="x", markersize=3)
    ax_steps.set_xlabel("learner version (optimizer steps)")
    ax_steps.set_ylabel("batch staleness (versions)")
    ax_steps.legend()
    ax_steps.grid(alpha=0.3)
    hist = dict(staleness_histogram or {})
    keys = sorted(hist)
    ax_hist.bar([str(k) for k in keys], [hist[k] for k in keys])
    ax_hist.set_xlabel("staleness at train time (versions)")
    ax_hist.set_ylabel("samples served")
    fig.suptitle("staleness")
    fig.tight_layout()
    fig.savefig(out_dir / "staleness.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "staleness.png")
    return written


def write_report_plots(
    report: Mapping[str, Any], records: Sequence[StepRecord], out_dir: Path, t0: float | None = None
) -> list[Path]:
    """`write_plots` for a finished run's report: its staleness histogram and its before/after
    accuracies (at version 0 and at its last step) as evaluation points."""
    points: list[tuple[int, float, float]] = []
    if report.get("accuracy_before") is not None:
        points.append((0, 0.0, float(report["accuracy_before"])))
    if report.get("accuracy_after") is not None:
        points.append((int(report["steps"]), float(report["wall_seconds"]), float(report["accuracy_after"])))
    hist = {int(k): int(v) for k, v in report["staleness_histogram"].items()}
    return write_plots(records, out_dir, hist, t0=t0, accuracy_points=points)


def _t0(records: Sequence[StepRecord]) -> float | None:
    stamps = [r.time for r in records if r.time is not None]
    return min(stamps) if stamps else None
