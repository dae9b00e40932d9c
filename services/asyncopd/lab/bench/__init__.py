"""`asyncopd bench NAME`: the group of benchmarks; each package contributes entries to BENCHMARKS.

A benchmark is a pair (add_args, run): `add_args(parser)` declares its options and
`run(args) -> exit code` measures and prints. Register one by adding it to BENCHMARKS below
(one line per benchmark) or by calling `register` before the CLI is built. This module only
wires names to functions; it knows nothing about what is measured.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from asyncopd.lab.bench import cache as cache_bench
from asyncopd.lab.bench import cache_load
from asyncopd.lab.bench import estimators as opd_bench
from asyncopd.lab.bench import fleet as fleet_bench
from asyncopd.lab.bench import learner as learner_bench
from asyncopd.lab.bench import pipeline as pipeline_bench
from asyncopd.lab.bench import rollout as rollout_bench
from asyncopd.lab.bench import teacher as teacher_bench
from asyncopd.lab.bench import weightsync as weightsync_bench

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

BENCHMARKS: dict[str, tuple[AddArgs, Run]] = {
    "cache": (cache_bench.add_args, cache_bench.run),
    "cache-load": (cache_load.add_args, cache_load.run),
    "estimators": (opd_bench.add_args, opd_bench.run),
    "fleet": (fleet_bench.add_args, fleet_bench.run),
    "learner": (learner_bench.add_args, learner_bench.run),
    "pipeline": (pipeline_bench.add_args, pipeline_bench.run),
    "rollout": (rollout_bench.add_args, rollout_bench.run),
    "teacher": (teacher_bench.add_args, teacher_bench.run),
    "weightsync": (weightsync_bench.add_args, weightsync_bench.run),
}


def register(name: str, add_args: AddArgs, run: Run) -> None:
    """Add a benchmark under `name`; a name can be taken once."""
    if name in BENCHMARKS:
        raise ValueError(f"benchmark {name!r} is already registered")
    BENCHMARKS[name] = (add_args, run)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("bench", help="run a benchmark: " + ", ".join(sorted(BENCHMARKS)))
    group = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (add_args, run) in sorted(BENCHMARKS.items()):
        sub = group.add_parser(name, help=f"see {run.__module__}")
        add_args(sub)
        sub.set_defaults(func=run)
