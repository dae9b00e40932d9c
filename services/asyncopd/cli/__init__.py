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

# command -> module that registers it (`add_parser(subparsers)`), in the order --help lists them.
COMMANDS: dict[str, str] = {
    "serve": "asyncopd.cli.serve",
    "config": "asyncopd.config.cli",
    "eval": "asyncopd.evaluation.cli",
    "toy": "asyncopd.lab.toytrain.cli",
    "run": "asyncopd.lab.launch.cli",
    "chaos": "asyncopd.lab.chaos.cli",
    "bench": "asyncopd.lab.bench",
    "study": "asyncopd.lab.study.cli",
}


def version() -> str:
    """The installed distribution's version ("unknown" when the package is imported uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("asyncopd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone: registering a command imports its
    module, and some (bench, eval) import torch and transformers, which a service started with
    `asyncopd serve cache` should not wait for."""
    parser = argparse.ArgumentParser(
        prog="asyncopd", description="Asynchronous on-policy distillation of language models."
    )
    parser.add_argument("-V", "--version", action="version", version=f"asyncopd {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):  # without importing every command's module (torch, transformers)
        print(f"asyncopd {version()}")
        return 0
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ConfigError as exc:
        print(f"asyncopd: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
