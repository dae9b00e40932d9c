"""The `asyncopd` command line: parse arguments, hand off to the package that owns the verb.

Each subcommand is registered by a small `add_parser(subparsers)` function that lives with
the code it runs, so this module only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from asyncopd.config import ConfigError

# module path of each subcommand group; each exposes `add_parser(subparsers)`.
_COMMAND_MODULES: tuple[str, ...] = (
    "asyncopd.serve_cli",
    "asyncopd.config.cli",
    "asyncopd.eval_cli",
    "asyncopd.toy.cli",
    "asyncopd.launch.cli",
    "asyncopd.chaos.cli",
    "asyncopd.benchmarks",
    "asyncopd.study.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncopd", description="Asynchronous on-policy distillation of language models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ConfigError as exc:
        print(f"asyncopd: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
