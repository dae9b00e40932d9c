"""`asyncopd run -c CONFIG [--set k=v ...] [--report PATH] [--resume [auto|PATH]]`: the whole
pipeline locally, each run in its own directory (`output_dir`, default `runs/{name}/{timestamp}`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from asyncopd.cli.serve import add_config_args

if TYPE_CHECKING:
    from asyncopd.evaluation.watcher import EvalSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline locally (Redis, cache, teachers, rollouts, learner) and report",
        description=(
            "Start Redis (or reuse the configured one), the cache, teacher and rollout replicas and the "
            "learner as local processes on loopback, show progress, stop them all, and write a report "
            "(JSON + plots) into the run's own directory (output_dir: default runs/{name}/{timestamp}, "
            "with a 'latest' link beside it; an earlier run is never deleted). --resume continues an "
            "interrupted run from its learner's newest checkpoint."
        ),
    )
    add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help=(
            "continue a run from its newest learner checkpoint, appending to its step log: 'auto' (the "
            "default when no value is given) = the run the 'latest' link of output_dir points at, or a run "
            "directory; without -c the run's own run-config.yaml is used (--set still applies)"
        ),
    )
    p.add_argument("--report", type=Path, default=None, help="report JSON path (default <output_dir>/report.json)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after greedy evaluations")
    p.add_argument("--no-teacher-eval", action="store_true", help="skip evaluating the teacher")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live table")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also start a local Prometheus scraping every service (prints its URL; needs the binary)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        metavar="N",
        help=(
            "also run the evaluator process beside the learner: every checkpoint it writes is sampled N times "
            "per test prompt, Avg@N and pass@k into <run dir>/eval_steps.jsonl and the report (0 = off)"
        ),
    )
    p.add_argument("--eval-k", default=None, help="comma-separated k of pass@k (default 1,N)")
    p.add_argument("--max-wall-s", type=float, default=None, help="give up if training takes longer than this")
    p.add_argument(
        "--startup-timeout-s", type=float, default=300.0, help="seconds each service may take to become healthy"
    )
    p.set_defaults(func=_run)


def _sampled_eval(args: argparse.Namespace) -> EvalSettings | None:
    from asyncopd.evaluation.watcher import EvalSettings

    if args.eval_samples <= 0:
        return None
    n = args.eval_samples
    ks = tuple(sorted({int(k) for k in (args.eval_k or f"1,{n}").split(",") if k.strip()}))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise SystemExit(f"asyncopd run: --eval-k must name k in 1..{n} (got {args.eval_k})")
    return EvalSettings(n=n, ks=ks)


def _run(args: argparse.Namespace) -> int:
    from asyncopd.config import load_config
    from asyncopd.lab.launch.processes import ChildDied
    from asyncopd.lab.launch.rundir import RUN_CONFIG_NAME, ResumeError, find_run, resume_point
    from asyncopd.lab.launch.runner import LaunchOptions, RunStopped, run_pipeline

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    resume = None
    if args.resume is not None:
        try:
            resume = resume_point(find_run(args.resume, config.output_dir, config.name))
        except ResumeError as exc:
            print(f"asyncopd run: {exc}", file=sys.stderr)
            return 2
        saved = resume.run_dir / RUN_CONFIG_NAME
        if not args.config:
            if not saved.is_file():
                print(f"asyncopd run: {saved} is missing; give the run's config with -c", file=sys.stderr)
                return 2
            config = load_config([str(saved)], args.overrides)
    options = LaunchOptions(
        report_path=args.report,
        evaluate=not args.no_eval,
        evaluate_teacher=not args.no_teacher_eval,
        live=not args.no_live,
        plots=not args.no_plots,
        prometheus=args.prometheus,
        max_wall_s=args.max_wall_s,
        startup_timeout_s=args.startup_timeout_s,
        resume=resume,
        sampled_eval=_sampled_eval(args),
    )
    try:
        report = run_pipeline(config, options)
    except KeyboardInterrupt:
        print("asyncopd run: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except RunStopped as exc:
        print(f"asyncopd run: {exc}; every process it started was stopped", file=sys.stderr)
        return 143
    except (ChildDied, TimeoutError) as exc:
        print(f"asyncopd run failed: {exc}", file=sys.stderr)
        return 1
    return 1 if report.get("invariant_violations") else 0
