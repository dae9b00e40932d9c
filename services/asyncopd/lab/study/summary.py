"""The study's numbers arranged per table: accuracies per row/staleness/seed, paired differences,
KL curves and probe statistics; plus the small statistics every table and finding uses.

Differences between two rows are *paired by seed* (same seed = same prompts and sampling
stream), which removes most between-seed variation. A difference counts as real when it exceeds
twice its standard error over seeds; with one seed there is no error bar and only its sign shows.

Pure: plain numbers in, plain numbers out; it knows the plan's rows and the runner's records.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncopd.lab.study.plan import TOY, Cell, Row, StudyPlan
from asyncopd.lab.study.runner import StudyRun, median_drift


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (nan for n = 1) and standard error of n values."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def signed(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if self.n < 2:
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} ± {self.std:.{digits}f}"


def spread(values: Sequence[float]) -> Spread:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return Spread(math.nan, math.nan, 0)
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return Spread(statistics.fmean(vals), std, len(vals))


def paired(a: Sequence[float], b: Sequence[float]) -> Spread:
    """Spread of the per-seed differences a_i − b_i."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return spread([x - y for x, y in zip(a, b, strict=True)])


def sign_of(d: Spread) -> int:
    """+1 / −1 when the difference exceeds 2 standard errors (the sign alone with one seed), else 0."""
    if d.n == 0 or math.isnan(d.mean):
        return 0
    if d.n == 1:
        return (d.mean > 0) - (d.mean < 0)
    if d.std == 0.0:
        return (d.mean > 0) - (d.mean < 0)
    return (d.mean > 0) - (d.mean < 0) if abs(d.mean) > 2 * d.se else 0


class Results:
    """Cell records indexed by (row, staleness, seed), and the probe's per-seed statistics."""

    def __init__(self, plan: StudyPlan, run: StudyRun) -> None:
        self.plan = plan
        self.run = run
        self.seeds = plan.size.seeds
        self._cells = {c["key"]: c for c in run.cells}

    def has(self, row: Row, staleness: int) -> bool:
        return all(Cell(row.overrides, staleness, seed, row.world).key in self._cells for seed in self.seeds)

    def record(self, row: Row, staleness: int, seed: int) -> dict[str, Any]:
        return self._cells[Cell(row.overrides, staleness, seed, row.world).key]

    def accuracies(self, row: Row, staleness: int) -> list[float]:
        return [float(self.record(row, staleness, seed)["accuracy"]) for seed in self.seeds]

    def accuracy(self, row: Row, staleness: int) -> Spread:
        return spread(self.accuracies(row, staleness))

    def drop(self, row: Row, staleness: int, reference: int = 0) -> Spread:
        """Paired accuracy change acc(s) − acc(reference), per seed."""
        return paired(self.accuracies(row, staleness), self.accuracies(row, reference))

    def mean_drop(self, row: Row, stalenesses: Sequence[int], reference: int = 0) -> list[float]:
        """Per seed: mean over `stalenesses` of acc(s) − acc(reference)."""
        ref = self.accuracies(row, reference)
        per_s = [self.accuracies(row, s) for s in stalenesses]
        return [statistics.fmean(acc[i] for acc in per_s) - ref[i] for i in range(len(self.seeds))]

    def held_out_kls(self, row: Row, staleness: int) -> list[float]:
        """Per seed: the cell's dense held-out KL(π‖p) after training (nan where not measured)."""
        out = []
        for seed in self.seeds:
            value = (self.record(row, staleness, seed).get("held_out") or {}).get("reverse_kl")
            out.append(math.nan if value is None else float(value))
        return out

    def held_out_kl(self, row: Row, staleness: int) -> Spread:
        return spread(self.held_out_kls(row, staleness))

    def kl_curve(self, row: Row, staleness: int) -> list[float]:
        """Per-step KL metric, mean over seeds."""
        curves = [self.record(row, staleness, seed)["kl"] for seed in self.seeds]
        return [statistics.fmean(values) for values in zip(*curves, strict=True)]

    def probe(self, label: str, stat: str) -> Spread:
        return spread([float(p["stats"][label][stat]) for p in self.run.probes])

    def probe_labels(self) -> list[str]:
        return list(self.run.probes[0]["stats"]) if self.run.probes else []

    def collapsed(self, cell: dict[str, Any]) -> bool:
        """A toy cell whose student ended below the untrained one (its policy ran away from μ:
        its drift measures the collapse, not the staleness)."""
        before = float(self.run.baseline.get("student_accuracy", math.nan))
        return cell.get("world", TOY) == TOY and float(cell["accuracy"]) < before

    def drift_values(self, staleness: int, world: str = TOY, *, collapsed: bool = False) -> list[float]:
        """Per MC cell of `world` at `staleness` (cells that trained, or with `collapsed` those that
        collapsed): the cell's median (log π_θ/μ)² over its batches exactly `staleness` versions stale."""
        return [
            d
            for c in self.run.cells
            if c.get("world", TOY) == world
            and int(c["staleness"]) == staleness
            and self.collapsed(c) == collapsed
            and math.isfinite(d := median_drift(c))
        ]

    def drift(self, staleness: int, world: str = TOY, *, collapsed: bool = False) -> float:
        """Staleness in log-ratio units: the median of `drift_values` (nan when no cell measures it)."""
        values = self.drift_values(staleness, world, collapsed=collapsed)
        return statistics.median(values) if values else math.nan
