"""`asyncopd serve SERVICE -c CONFIG [--set k=v ...] [--name NAME]`: run one service process.

Each service package exposes `asyncopd.<service>.main.serve(config, name)` which blocks until
the process is told to stop (SIGTERM/SIGINT). This module only parses and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os

from asyncopd.config import load_config

SERVICES = ("cache", "rollout", "teacher", "learner", "autoscaler")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The config options every config-driven command takes."""
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=None,
        help="run config YAML (default: built-in defaults); repeat to compose files, later ones winning",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set learner.lr=3e-4 (repeatable)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("serve", help="run one service (cache, rollout, teacher, learner, autoscaler)")
    p.add_argument("service", choices=SERVICES)
    add_config_args(p)
    p.add_argument("--name", default=None, help="replica name (default: service-<pid>)")
    p.add_argument("--log-level", default=os.environ.get("ASYNCOPD_LOG_LEVEL", "INFO"))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    name = args.name or f"{args.service}-{os.getpid()}"
    module = importlib.import_module(f"asyncopd.{args.service}.main")
    module.serve(config, name)
    return 0
