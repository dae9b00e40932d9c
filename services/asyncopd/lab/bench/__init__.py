"""`asyncopd bench NAME`: the group of benchmarks; each package contributes entries to BENCHMARKS.

A benchmark is a pair (add_args, run): `add_args(parser)` declares its options and
`run(args) -> exit code` measures and prints. Register one by naming its module in _BUILT_IN
below (one line per benchmark) or by calling `register` before the CLI is built. This module only
wires names to functions; it knows nothing about what is measured.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# Built-in benchmarks by name -> the module (in this package) holding their add_args and run. A
# module is imported when the `bench` CLI is built, not when this package is: a process spawned
# to run one benchmark's child (the cache of `bench cache-load`, a fleet's replicas) imports
# `asyncopd.lab.bench.<module>` and so this package, and must not pay transformers and torch
# for the benchmarks it does not run (~4 s each on this box).
_BUILT_IN: dict[str, str] = {
    "cache": "cache",
    "cache-load": "cache_load",
    "estimators": "estimators",
    "fleet": "fleet",
    "grpc-floor": "grpc_floor",
    "learner": "learner",
    "pipeline": "pipeline",
    "rollout": "rollout",
    "teacher": "teacher",
    "weightsync": "weightsync",
}

# Benchmarks added with `register` (and the built-ins, once `benchmarks()` has imported them).
BENCHMARKS: dict[str, tuple[AddArgs, Run]] = {}


def benchmarks() -> dict[str, tuple[AddArgs, Run]]:
    """Every benchmark by name: the built-ins (their modules imported now) and the registered ones."""
    for name, module_name in _BUILT_IN.items():
        if name not in BENCHMARKS:
            module = importlib.import_module(f"{__name__}.{module_name}")
            BENCHMARKS[name] = (module.add_args, module.run)
    return BENCHMARKS


def register(name: str, add_args: AddArgs, run: Run) -> None:
    """Add a benchmark under `name`; a name can be taken once."""
    if name in BENCHMARKS or name in _BUILT_IN:
        raise ValueError(f"benchmark {name!r} is already registered")
    BENCHMARKS[name] = (add_args, run)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    every = benchmarks()
    parser = subparsers.add_parser("bench", help="run a benchmark: " + ", ".join(sorted(every)))
    group = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (add_args, run) in sorted(every.items()):
        sub = group.add_parser(name, help=f"see {run.__module__}")
        add_args(sub)
        sub.set_defaults(func=run)
