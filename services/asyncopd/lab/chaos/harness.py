"""`asyncopd chaos`: a local pipeline run with faults injected on a schedule, then checked.

Optionally first a fault-free run of the same config (the accuracy reference), then the run
with faults, which trains at least `learner.steps` and goes on past them until every fault has
been survived (recoveries take wall time while the learner trains, so the versions a schedule
reaches depend on the machine): its own private Redis with an fsync-always append-only file (so Redis can be
killed and restarted, or wiped), the learner resuming from checkpoints and logging its sample
ids. Afterwards: the fault table (injected / survived / recovery), the accounting summed over
Redis epochs (produced = trained + dropped + in_flight; samples lost silently must be 0), the
step-log checks (versions monotonic, no sample trained twice), versions polled from the learner,
and the final accuracy against the fault-free run. Written as chaos.json and chaos.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from asyncopd.config import load_config
from asyncopd.lab.chaos.checks import (
    accuracy_in_line,
    check_step_log,
    combined_accounting,
    longest_gap,
    regressions,
    skipped_positions,
)
from asyncopd.lab.chaos.faults import FaultSpec
from asyncopd.lab.chaos.injector import Injector
from asyncopd.lab.launch.processes import ChildDied
from asyncopd.lab.launch.runner import STEP_LOG_NAME, LaunchOptions, run_pipeline

# What the checks need of every chaos run, whatever the config says.
REQUIRED = ["learner.resume=true", "learner.log_sample_ids=true"]


@dataclass(frozen=True)
class ChaosSettings:
    schedule: list[FaultSpec]
    out: Path
    baseline: bool = True
    baseline_accuracy: float | None = None
    tolerance: float = 0.1
    max_wall_s: float = 1800.0
    evaluate: bool = True
    # learner.steps is the least the run trains; it goes on (to at most `overrun` x that) until
    # every fault is survived and the learner is `tail_steps` past the last recovery.
    overrun: float = 3.0
    tail_steps: int = 10


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of a file (a torn last line from a killed writer is skipped)."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_chaos(
    config_path: str | None, overrides: Sequence[str], settings: ChaosSettings, console: Console
) -> dict[str, Any]:
    out = settings.out.resolve()
    baseline_report: dict[str, Any] | None = None
    baseline_accuracy = settings.baseline_accuracy
    if settings.baseline and baseline_accuracy is None and settings.evaluate:
        console.rule("fault-free run (accuracy reference)")
        base = load_config(config_path, [*overrides, *REQUIRED, f"output_dir={out / 'fault-free'}"])
        _clean(out / "fault-free")
        baseline_report = run_pipeline(
            base,
            LaunchOptions(live=False, evaluate_teacher=False, plots=False, max_wall_s=settings.max_wall_s),
            console,
        )
        baseline_accuracy = baseline_report.get("accuracy_after")

    console.rule(f"run with {len(settings.schedule)} faults")
    run_dir = out / "faults"
    _clean(run_dir)
    asked = load_config(config_path, [*overrides, *REQUIRED, f"output_dir={run_dir}"]).learner.steps
    room = max(asked, round(asked * settings.overrun))
    config = load_config(config_path, [*overrides, *REQUIRED, f"output_dir={run_dir}", f"learner.steps={room}"])
    console.print(
        f"training at least {asked} steps: on until every fault is survived and {settings.tail_steps} "
        f"steps past the last recovery (at most {room})"
    )
    injector = Injector(
        list(settings.schedule), redis_dir=run_dir / "redis", finish_at=asked, tail_steps=settings.tail_steps
    )
    options = LaunchOptions(
        live=False,
        evaluate=settings.evaluate,
        evaluate_teacher=False,
        skip_eval_before=baseline_report is not None,
        plots=True,
        max_wall_s=settings.max_wall_s,
        poll_s=0.25,  # faults fire close to their version
        private_redis=True,
        redis_persistence_dir=run_dir / "redis",
        on_tick=injector,
    )
    report: dict[str, Any] | None = None
    failure: str | None = None
    try:
        report = run_pipeline(config, options, console)
    except (ChildDied, TimeoutError, RuntimeError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    result = assess(
        report,
        injector,
        read_jsonl(run_dir / STEP_LOG_NAME),
        baseline_accuracy=baseline_accuracy,
        tolerance=settings.tolerance,
        failure=failure,
    )
    if baseline_report is not None:
        result["fault_free"] = _brief(baseline_report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "chaos.md").write_text(markdown(result))
    return result


def assess(
    report: Mapping[str, Any] | None,
    injector: Injector,
    step_records: Sequence[Mapping[str, Any]],
    *,
    baseline_accuracy: float | None,
    tolerance: float,
    failure: str | None = None,
) -> dict[str, Any]:
    """Every check of one chaos run, as a JSON-ready dict with a `problems` list (empty = pass)."""
    problems: list[str] = []
    if failure is not None:
        problems.append(f"the run did not finish: {failure}")
    step_times = [float(r["time_unix"]) for r in step_records if r.get("event") == "step" and "time_unix" in r]
    fired_at = [o.fired_unix for o in injector.outcomes]
    for i, o in enumerate(injector.outcomes):
        if o.fired_unix is not None:
            # Up to 5 s past recovery (the first steps after a restart are part of its cost), but
            # not into the next fault's stall.
            end = (o.recovered_unix or o.fired_unix) + 5.0
            later = [t for t in fired_at[i + 1 :] if t is not None]
            if later:
                end = min(end, later[0])
            gap = longest_gap(step_times, o.fired_unix, end)
            o.stall_s = None if gap is None else round(gap, 2)
    faults = [o.as_dict() for o in injector.outcomes]
    fired = {o.label for o in injector.outcomes}
    for spec in injector.schedule:
        if spec.label not in fired:
            problems.append(f"fault {spec.label} never fired (the run ended first)")
    for o in injector.outcomes:
        if o.error:
            problems.append(f"fault {o.label}: {o.error}")
        elif not o.survived:
            problems.append(f"fault {o.label}: the learner made no progress after recovery")
    accounting = None
    if report is not None:
        final = {
            "produced": report["produced"],
            "trained": report["trained"],
            "admitted": report.get("admitted", 0),
            "dropped": report["dropped"],
            "in_flight": report["in_flight"],
            "staleness_served": report["staleness_histogram"],
        }
        accounting = combined_accounting(injector.redis_epochs, final)
        if accounting["unaccounted"] != 0:
            problems.append(
                f"{accounting['unaccounted']} sample(s) unaccounted for (produced != trained + dropped + in_flight)"
            )
        served = [int(k) for k, v in accounting["staleness_served"].items() if v]
        if served and max(served) > int(report["max_staleness"]):
            problems.append(f"staleness {max(served)} served; the bound is {report['max_staleness']}")
    verdict = check_step_log(step_records)
    problems += verdict.problems()
    skipped = None if accounting is None else skipped_positions(verdict, accounting)
    if skipped:
        problems.append(
            f"{skipped} prompt position(s) skipped: {verdict.position_holes} holes below the highest trained "
            "position, more than the samples dropped, in flight or voided"
        )
    polled = regressions(injector.versions)
    problems += polled
    accuracy_ok, accuracy_note = accuracy_in_line(
        None if report is None else report.get("accuracy_after"), baseline_accuracy, tolerance
    )
    if accuracy_ok is False:
        problems.append(f"accuracy not in line with the fault-free run: {accuracy_note}")
    return {
        "faults": faults,
        "faults_injected": sum(1 for o in injector.outcomes if o.error is None),
        "faults_survived": sum(1 for o in injector.outcomes if o.survived and o.error is None),
        "samples_lost": None if accounting is None else accounting["unaccounted"],
        "accounting": accounting,
        "step_log": verdict.__dict__,
        "positions_skipped": skipped,
        "version_regressions": polled,
        "accuracy": {
            "after": None if report is None else report.get("accuracy_after"),
            "before": None if report is None else report.get("accuracy_before"),
            "fault_free": baseline_accuracy,
            "in_line": accuracy_ok,
            "note": accuracy_note,
        },
        "run": None if report is None else _brief(report),
        "problems": problems,
        "passed": not problems,
    }


def _brief(report: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("steps", "wall_seconds", "train_tokens_per_second", "accuracy_before", "accuracy_after", "output_dir")
    return {k: report.get(k) for k in keys}


def _clean(directory: Path) -> None:
    """A chaos run resumes from its own checkpoints: never from an earlier run's."""
    # (the launcher itself starts a fresh step log)
    for sub in ("checkpoints", "redis"):
        shutil.rmtree(directory / sub, ignore_errors=True)


def fault_table(result: Mapping[str, Any]) -> Table:
    table = Table(title=f"asyncopd chaos: {'PASSED' if result['passed'] else 'FAILED'}")
    for col in ("fault", "fired at", "target", "survived", "stall s", "detail"):
        table.add_column(col)
    for f in result["faults"]:
        table.add_row(
            f["label"],
            "-" if f["fired_version"] is None else f"v{f['fired_version']}",
            f["target"] or "-",
            "yes" if f["survived"] and not f["error"] else "NO",
            "-" if f["stall_s"] is None else f"{f['stall_s']:.1f}",
            f["error"] or f["detail"],
        )
    return table


def markdown(result: Mapping[str, Any]) -> str:
    """chaos.md: the fault table, the totals and every problem found."""
    lines = ["# asyncopd chaos", "", f"**{'PASSED' if result['passed'] else 'FAILED'}**", ""]
    lines += [
        "| fault | fired at | target | survived | learner stalled (s) | what happened |",
        "|---|---|---|---|---|---|",
    ]
    for f in result["faults"]:
        survived = "yes" if f["survived"] and not f["error"] else "**no**"
        fired = "-" if f["fired_version"] is None else f"v{f['fired_version']}"
        stall = "-" if f["stall_s"] is None else f"{f['stall_s']:.1f}"
        what = f["error"] or f["detail"]
        lines.append(f"| {f['label']} | {fired} | {f['target'] or '-'} | {survived} | {stall} | {what} |")
    acc = result["accounting"] or {}
    log = result["step_log"]
    accuracy = result["accuracy"]
    lines += [
        "",
        "| faults injected | survived | samples lost silently | dropped (counted, by reason) | trained twice | "
        "positions trained twice / skipped | version regressions | accuracy after (fault-free) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['faults_injected']} | {result['faults_survived']} | {result['samples_lost']} | "
        f"{acc.get('dropped', '-')} | {len(log['trained_twice'])} | "
        f"{len(log.get('positions_trained_twice', []))} / {result.get('positions_skipped', '-')} | "
        f"{len(log['version_regressions']) + len(result['version_regressions'])} | "
        f"{_f(accuracy['after'])} ({_f(accuracy['fault_free'])}) |",
        "",
        f"Accounting over {acc.get('redis_epochs', '-')} Redis epoch(s): produced {acc.get('produced', '-')} = "
        f"trained {acc.get('trained', '-')} + dropped {acc.get('dropped_total', '-')} + in flight "
        f"{acc.get('in_flight', '-')}. Step log: {log['steps']} steps ({log['void_steps']} voided by learner "
        f"restarts, their updates lost with the killed learner), {log['starts']} learner start(s).",
        "",
    ]
    if result["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in result["problems"]] + [""]
    return "\n".join(lines)


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
