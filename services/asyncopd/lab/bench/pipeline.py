"""`asyncopd bench pipeline`: strict sync vs n-step-off vs fully async on one config and step count.

Each mode is a full local run (`LocalRun`) with only `max_staleness` changed. Printed and
written as JSON: train tokens/s, wall time and final accuracy of each mode, the throughput
ratio of each to sync, and the *ideal* ratio — (sum of stage busy times) / (largest stage busy
time), from the per-stage times the sync run measured (rollout generation, teacher scoring,
learner compute and weight sync) — with how close each mode gets to it. On a machine where
the stages share a few cores the ideal is not reachable; the numbers say by how much.

This module only runs the launcher several times and compares reports.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from asyncopd.cli.serve import add_config_args

# Stages that run concurrently in async mode (the learner's data wait is not a stage: it is
# the time the learner spends waiting for the others).
STAGES = ("rollout", "teacher", "learner_compute", "learner_weight_sync")


def ideal_ratio(stage_seconds: Mapping[str, float]) -> float | None:
    """(sum of stage times) / (max stage time): the speed-up of perfect overlap over serial stages."""
    times = [float(stage_seconds[s]) for s in STAGES if stage_seconds.get(s)]
    if not times or max(times) <= 0:
        return None
    return sum(times) / max(times)


def compare(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison table of several reports; the first must be the sync run."""
    if not reports or reports[0]["max_staleness"] != 0:
        raise ValueError("the first report must be the strict synchronous run (max_staleness 0)")
    sync_tps = reports[0].get("train_tokens_per_second") or 0.0
    ideal = ideal_ratio(reports[0].get("stage_seconds") or {})
    rows = []
    for rep in reports:
        tps = rep.get("train_tokens_per_second")
        ratio = tps / sync_tps if tps and sync_tps else None
        rows.append(
            {
                "mode": rep["mode"],
                "max_staleness": rep["max_staleness"],
                "steps": rep["steps"],
                "wall_seconds": rep["wall_seconds"],
                "train_tokens_per_second": tps,
                "ratio_to_sync": None if ratio is None else round(ratio, 3),
                "fraction_of_ideal": None if ratio is None or not ideal else round(ratio / ideal, 3),
                "accuracy_after": rep.get("accuracy_after"),
                "max_staleness_served": rep.get("max_staleness_served"),
                "invariant_violations": rep.get("invariant_violations", []),
            }
        )
    return {
        "ideal_ratio": None if ideal is None else round(ideal, 3),
        "sync_stage_seconds": reports[0].get("stage_seconds"),
        "accuracy_before": reports[0].get("accuracy_before"),
        "rows": rows,
    }


def comparison_table(result: Mapping[str, Any]) -> Table:
    ideal = result.get("ideal_ratio")
    table = Table(title=f"bench pipeline (ideal async/sync ratio {ideal if ideal is not None else '-'})")
    for col in ("mode", "bound", "steps", "wall s", "train tok/s", "x sync", "of ideal", "acc after", "max stale"):
        table.add_column(col)

    def f(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    for row in result["rows"]:
        table.add_row(
            row["mode"],
            str(row["max_staleness"]),
            str(row["steps"]),
            f(row["wall_seconds"]),
            f(row["train_tokens_per_second"]),
            f(row["ratio_to_sync"]),
            f(row["fraction_of_ideal"]),
            f(row["accuracy_after"]),
            f(row["max_staleness_served"]),
        )
    return table


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="learner steps of every mode (default: config)")
    parser.add_argument(
        "--bounds",
        default=None,
        help="comma-separated max_staleness values after sync (default: 1 and the step count = fully async)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pipeline"), help="output folder")
    parser.add_argument("--no-eval", action="store_true", help="skip accuracy evaluations (throughput only)")


def run(args: argparse.Namespace) -> int:
    from asyncopd.config import load_config
    from asyncopd.lab.launch.runner import LaunchOptions, run_pipeline

    console = Console(stderr=True)
    base_overrides = list(args.overrides)
    if args.steps is not None:
        base_overrides.append(f"learner.steps={args.steps}")
    steps = load_config(args.config, base_overrides).learner.steps
    bounds = [int(b) for b in args.bounds.split(",")] if args.bounds else [1, steps]
    reports: list[dict[str, Any]] = []
    for i, bound in enumerate([0, *bounds]):
        out = (args.out / f"staleness-{bound}").resolve()
        config = load_config(args.config, [*base_overrides, f"max_staleness={bound}", f"output_dir={out}"])
        console.rule(f"max_staleness={bound}")
        options = LaunchOptions(
            evaluate=not args.no_eval,
            evaluate_teacher=False,
            live=False,
            skip_eval_before=i > 0,
        )
        reports.append(run_pipeline(config, options, console))
    result = compare(reports)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_pipeline.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(comparison_table(result))
    console.print(f"written: {path}")
    return 1 if any(r["invariant_violations"] for r in result["rows"]) else 0
