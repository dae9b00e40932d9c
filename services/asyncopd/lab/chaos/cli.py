"""`asyncopd chaos -c CONFIG [--faults SCHEDULE] [--out DIR]`: inject faults into a local run and check it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from asyncopd.cli.serve import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "chaos",
        help="run the pipeline with faults injected on a schedule (kills, restarts, Redis wipes) and check it",
        description=(
            "Run the local pipeline, inject faults when the learner reaches given versions (kill -9 of "
            "rollout replicas, teachers, the cache, the learner; Redis restarts with and without its data and "
            "from an AOF cut short; a replica frozen during weight broadcasts or cut off weight sync; the "
            "learner killed between checkpoint and ack; a full checkpoint disk; a poison rollout; hostile "
            "clients), and check: produced = trained + dropped + in_flight over Redis restarts, no sample or "
            "prompt position trained twice or skipped, versions monotonic, accuracy in line with a fault-free "
            "run. Writes chaos.json and chaos.md; exits 1 if any check fails."
        ),
    )
    add_config_args(p)
    p.add_argument(
        "--faults",
        default=None,
        help=(
            "comma-separated kind@version[:target] (kinds: see docs/chaos.md); default: every kind, spread over the run"
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/chaos"), help="output folder")
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free reference run")
    p.add_argument("--baseline-accuracy", type=float, default=None, help="fault-free accuracy to compare with")
    p.add_argument("--tolerance", type=float, default=0.1, help="accuracy may fall this far below fault-free")
    p.add_argument("--no-eval", action="store_true", help="skip accuracy evaluations")
    p.add_argument("--max-wall-s", type=float, default=1800.0, help="give up on a run after this long")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from asyncopd.config import load_config
    from asyncopd.lab.chaos.faults import default_schedule, parse_schedule
    from asyncopd.lab.chaos.harness import ChaosSettings, fault_table, run_chaos

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    steps = load_config(args.config, args.overrides).learner.steps
    try:
        schedule = parse_schedule(args.faults) if args.faults else default_schedule(steps)
    except ValueError as exc:
        console.print(f"asyncopd chaos: --faults: {exc}")
        return 2
    too_late = [f.label for f in schedule if f.at_version >= steps]
    if too_late:
        console.print(f"asyncopd chaos: --faults: {', '.join(too_late)} at or after the last step ({steps})")
        return 2
    settings = ChaosSettings(
        schedule=schedule,
        out=args.out,
        baseline=not args.no_baseline,
        baseline_accuracy=args.baseline_accuracy,
        tolerance=args.tolerance,
        max_wall_s=args.max_wall_s,
        evaluate=not args.no_eval,
    )
    result = run_chaos(args.config, args.overrides, settings, console)
    Console().print(fault_table(result))
    for problem in result["problems"]:
        console.print(f"[red]problem:[/red] {problem}")
    console.print(f"written: {args.out / 'chaos.json'}, {args.out / 'chaos.md'}")
    return 0 if result["passed"] else 1
