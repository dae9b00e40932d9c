"""PNG plots of a run from its step records: accuracy and KL vs step and vs wall time,
training throughput, and staleness — a rolling mean of every trained sample's staleness with a
10–90 % quantile band (pooled over the last steps, so the per-step zigzag between two values
does not hide the trend), a heatmap of version × staleness, and the served histogram. Every
title names the run and its mode (`run_label`).

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


def pooled_quantile(hist: Mapping[int, int], q: float) -> float:
    """The q-quantile of a {value: count} histogram (the smallest value with >= q of the mass)."""
    total = sum(hist.values())
    if total <= 0:
        raise ValueError("empty histogram")
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= q * total:
            return float(value)
    return float(max(hist))


def staleness_bands(
    records: Sequence[StepRecord], window: int, quantiles: tuple[float, float] = (0.1, 0.9)
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(versions, mean, low, high) of per-sample staleness pooled over each step and the
    `window - 1` steps before it (steps with a staleness histogram only)."""
    steps = [r for r in records if r.is_step and r.staleness_hist]
    xs: list[int] = []
    mean: list[float] = []
    low: list[float] = []
    high: list[float] = []
    for i, rec in enumerate(steps):
        pooled: dict[int, int] = {}
        for r in steps[max(0, i - window + 1) : i + 1]:
            for value, count in (r.staleness_hist or {}).items():
                pooled[value] = pooled.get(value, 0) + count
        total = sum(pooled.values())
        xs.append(rec.version)
        mean.append(sum(v * n for v, n in pooled.items()) / total)
        low.append(pooled_quantile(pooled, quantiles[0]))
        high.append(pooled_quantile(pooled, quantiles[1]))
    return xs, mean, low, high


def staleness_grid(records: Sequence[StepRecord], max_columns: int = 60) -> tuple[list[int], list[list[float]]]:
    """(left edge version of each column, rows[staleness][column] = share of the column's samples
    with that staleness) over the steps with a histogram, in at most `max_columns` columns."""
    steps = [r for r in records if r.is_step and r.staleness_hist]
    if not steps:
        return [], []
    per = max(1, -(-len(steps) // max_columns))
    columns = [steps[i : i + per] for i in range(0, len(steps), per)]
    top = max(max(r.staleness_hist or {0: 0}) for r in steps)
    rows = [[0.0] * len(columns) for _ in range(top + 1)]
    for c, group in enumerate(columns):
        counts: dict[int, int] = {}
        for r in group:
            for value, n in (r.staleness_hist or {}).items():
                counts[value] = counts.get(value, 0) + n
        total = sum(counts.values()) or 1
        for value, n in counts.items():
            rows[value][c] = n / total
    return [g[0].version for g in columns], rows


def _titled(run_label: str | None, title: str) -> str:
    return f"{run_label}\n{title}" if run_label else title


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
    *,
    t0: float | None = None,
    accuracy_points: Sequence[tuple[int, float, float]] = (),
    run_label: str | None = None,
    max_staleness: int | None = None,
) -> list[Path]:
    """Write the run's PNGs into `out_dir`; returns their paths.

    `accuracy_points` adds (version, wall seconds, accuracy) evaluations done outside the
    learner (the launcher's before/after evaluations); `run_label` (the run's name and mode)
    heads every title; `max_staleness` draws the bound on the staleness plot.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    times = wall_times(records, t0)
    written: list[Path] = []

    xs, ts, ys = _pairs(records, times, "accuracy")
    points = sorted([*zip(xs, ts, ys, strict=True), *accuracy_points])
    written.append(
        _vs_step_and_time(
            out_dir / "accuracy.png",
            _titled(run_label, "greedy test accuracy"),
            "accuracy",
            xs=[p[0] for p in points],
            ts=[p[1] for p in points],
            ys=[p[2] for p in points],
        )
    )

    steps = [r for r in records if r.is_step]
    step_times = wall_times(steps, t0 if t0 is not None else _t0(records))
    xs, ts, ys = _pairs(steps, step_times, "kl")
    kl_title = _titled(run_label, "KL estimate per step")
    written.append(_vs_step_and_time(out_dir / "kl.png", kl_title, "KL", xs=xs, ts=ts, ys=ys))

    tx, ty = throughput_series(records, t0 if t0 is not None else _t0(records))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(tx, ty, alpha=0.35, label="per step")
    ax.plot(tx, moving_average(ty, 10), label="mean of 10 steps")
    ax.legend()
    ax.set_xlabel("learner version (optimizer steps)")
    ax.set_ylabel("train tokens / s")
    ax.set_ylim(bottom=0)  # a rate from zero: no offset axis magnifying float noise
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(_titled(run_label, "training throughput"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "throughput.png")

    written.append(
        _staleness_plot(
            out_dir / "staleness.png",
            steps,
            step_times,
            staleness_histogram=staleness_histogram,
            run_label=run_label,
            max_staleness=max_staleness,
        )
    )
    return written


def _staleness_plot(
    path: Path,
    steps: Sequence[StepRecord],
    step_times: Sequence[float | None],
    *,
    staleness_histogram: Mapping[int, int] | None,
    run_label: str | None,
    max_staleness: int | None,
) -> Path:
    """Rolling mean with a 10-90 % band | version x staleness heatmap | served histogram."""
    fig, (ax_band, ax_heat, ax_hist) = plt.subplots(1, 3, figsize=(15, 4.2))
    window = max(5, min(25, len(steps) // 20))
    xs, mean, low, high = staleness_bands(steps, window)
    if xs:
        ax_band.fill_between(xs, low, high, step="mid", alpha=0.25, label="10-90 % of samples")
        ax_band.plot(xs, mean, label=f"mean (last {window} steps)")
    else:  # an older log without per-step histograms: the per-step mean, smoothed
        mx, _, ys = _pairs(steps, step_times, "staleness_mean")
        ax_band.plot(mx, moving_average(ys, window), label=f"mean (last {window} steps)")
    if max_staleness is not None:
        ax_band.axhline(max_staleness, color="red", linestyle=":", label=f"bound {max_staleness}")
    ax_band.set_xlabel("learner version (optimizer steps)")
    ax_band.set_ylabel("staleness of trained samples (versions)")
    ax_band.set_title("staleness over training")
    ax_band.legend(loc="lower right", fontsize=8)
    ax_band.grid(alpha=0.3)

    columns, rows = staleness_grid(steps)
    if rows:
        last = steps[-1].version
        image = ax_heat.imshow(
            rows,
            origin="lower",
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            extent=(columns[0] - 0.5, last + 0.5, -0.5, len(rows) - 0.5),
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax_heat, label="share of samples")
        ax_heat.set_yticks(range(len(rows)))
    else:
        ax_heat.text(0.5, 0.5, "no per-step histograms in the log", ha="center", va="center")
    ax_heat.set_xlabel("learner version (optimizer steps)")
    ax_heat.set_ylabel("staleness (versions)")
    ax_heat.set_title("staleness by version")

    hist = dict(staleness_histogram or {})
    keys = sorted(hist)
    ax_hist.bar([str(k) for k in keys], [hist[k] for k in keys])
    ax_hist.set_xlabel("staleness at train time (versions)")
    ax_hist.set_ylabel("samples served")
    ax_hist.set_title("served, whole run")
    fig.suptitle(_titled(run_label, "staleness"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report_plots(
    report: Mapping[str, Any], records: Sequence[StepRecord], out_dir: Path, t0: float | None = None
) -> list[Path]:
    """`write_plots` for a finished run's report: its staleness histogram, its before/after
    accuracies (at version 0 and at its last step) as evaluation points, titles naming the run."""
    points: list[tuple[int, float, float]] = []
    if report.get("accuracy_before") is not None:
        points.append((0, 0.0, float(report["accuracy_before"])))
    if report.get("accuracy_after") is not None:
        points.append((int(report["steps"]), float(report["wall_seconds"]), float(report["accuracy_after"])))
    hist = {int(k): int(v) for k, v in report["staleness_histogram"].items()}
    return write_plots(
        records,
        out_dir,
        hist,
        t0=t0,
        accuracy_points=points,
        run_label=run_label(report),
        max_staleness=report.get("max_staleness"),
    )


def run_label(report: Mapping[str, Any]) -> str:
    """What every plot's title says of the run: its name, mode, bound and estimator."""
    label = f"{report.get('name', 'run')}: {report.get('mode', '?')} (max_staleness {report.get('max_staleness')})"
    if report.get("estimator"):
        label += f", {report['estimator']}"
    return label


def _t0(records: Sequence[StepRecord]) -> float | None:
    stamps = [r.time for r in records if r.time is not None]
    return min(stamps) if stamps else None
