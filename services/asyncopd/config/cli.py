"""`asyncopd config schema|show|check`: print the JSON schema, the resolved config, or validate."""

from __future__ import annotations

import argparse
import json

from asyncopd.config.loader import dump_config, load_config
from asyncopd.config.run import RunConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "config",
        help="inspect and validate run configs",
        description="Defaults <- -c files in order <- ASYNCOPD_<SECTION>__<FIELD> environment variables <- --set.",
    )
    sub = p.add_subparsers(dest="config_command", required=True)
    schema = sub.add_parser("schema", help="print the JSON schema of the run config (every field, documented)")
    schema.set_defaults(func=_schema)
    for name, fn, text in (
        ("show", _show, "print the resolved config (YAML, secrets masked)"),
        ("check", _check, "validate a config; exit 2 with the field path on errors"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument(
            "-c",
            "--config",
            action="append",
            default=None,
            help="run config YAML; repeat to compose files in order (later ones win)",
        )
        q.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field after the files and ASYNCOPD_* environment variables (repeatable)",
        )
        q.set_defaults(func=fn)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(RunConfig.model_json_schema(), indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    load_config(args.config, args.overrides)
    print("config OK")
    return 0
