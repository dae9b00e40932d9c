"""`asyncopd study`: run the staleness study and write study.md, study.json and plots under --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncopd.cli.serve import add_config_args

if TYPE_CHECKING:
    from asyncopd.lab.study.plan import StudyPlan, StudySize
    from asyncopd.lab.study.runner import Source


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "study",
        help="the paper's staleness study on the toy task (fixed staleness, in one process)",
        description=(
            "Train fresh students with rollouts exactly s versions stale, on the project's own engine, "
            "teacher scorer, trainer and estimators: (1) forward vs reverse KL at s=0,1,2,4,8, (2) corrections "
            "for stale reverse KL, (3) sparse top-K vs MC reverse KL (gradient bias/variance and accuracy), "
            "(4 = wide) sparse top-K vs MC vs forward top-K in the wide-vocabulary world (`make wide`), with the "
            "dense held-out KL(student || teacher). Writes study.md, study.json and PNG plots under --out."
        ),
    )
    add_config_args(p)  # -c defaults to configs/toy.yaml here (see _run)
    p.add_argument("--out", type=Path, default=Path("results/study"), help="output folder (default results/study)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="rollout batches per cell (default 150; --quick 3)")
    p.add_argument(
        "--parts",
        default="1,2,3,4",
        help="which parts to run, e.g. 1,3 or wide (= 4, the wide world; needs `make wide`) (default 1,2,3,4)",
    )
    p.add_argument(
        "--wide-config",
        default="configs/wide.yaml",
        help="config of part 4's wide-vocabulary world (default configs/wide.yaml; --set does not apply to it)",
    )
    p.add_argument(
        "--wide-steps", type=int, default=None, help="part 4: rollout batches per wide cell (default 4; --quick 1)"
    )
    p.add_argument(
        "--wide-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of part 4's config for every wide cell (repeatable), e.g. learner.lr=1e-4 "
        "(a row's own overrides, such as the forward rows' lr, still win)",
    )
    p.add_argument("--test-size", type=int, default=None, help="test prompts per evaluation (default 200)")
    p.add_argument("--draws", type=int, default=None, help="R: gradient draws per MC estimator in part 3a (default 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="cells trained in parallel, one process and one torch thread each (default: min(2, CPUs))",
    )
    p.add_argument(
        "--minibatches-per-batch",
        type=int,
        default=None,
        help="optimizer steps per rollout batch (learner.mini_batches; π_prox fixed per batch; default 4 as in "
        "the paper's code); a version of staleness is one rollout batch",
    )
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first choose learner.lr so that one version of staleness gives a median (log π_θ/μ)² of about 1e-3 "
        "(short runs at s=1; the toy and, with part 4, the wide world each get their own lr), then run the study "
        "at those lrs (default on; --no-calibrate keeps the configs' lr)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse what <out>/study.json already holds (cells, probes, baselines, the calibrated lrs) and run "
        "only what it lacks, e.g. after an interruption or a new row; refused if it ran other settings",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="re-render study.md and the plots from an existing <out>/study.json without training",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny study for CI: 1 seed, 3 rollout batches, 2 staleness values, R=4; part 4: 1 batch of 4 rollouts "
        "cut at 48 tokens, 2 test and 2 held-out prompts (every row still trains)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from asyncopd.lab.study.plan import StudyPlan, StudySize, parse_parts, seeds_from
    from asyncopd.lab.study.report import write_report
    from asyncopd.lab.study.runner import Source, run_study
    from asyncopd.lab.study.summary import Results

    if args.report_only:
        from asyncopd.lab.study.report import load_results

        saved = args.out / "study.json"
        if not saved.is_file():
            raise SystemExit(f"--report-only: {saved} does not exist; run the study first")
        results, saved_source, workers = load_results(saved)
        written = write_report(results, saved_source, args.out, workers)
        print(f"re-rendered {written['markdown']} from {saved}")
        return 0
    paths = args.config or ["configs/toy.yaml"]
    if len(paths) > 1:
        raise SystemExit("asyncopd study: give one -c file (the study records it as the source of every cell)")
    source = Source(paths[0], tuple(args.overrides))
    base = source.config()
    size = StudySize.quick() if args.quick else StudySize()
    changes: dict[str, object] = {"seeds": seeds_from(base.seed, args.seeds or len(size.seeds))}
    for name, value in (
        ("steps", args.steps),
        ("test_size", args.test_size),
        ("draws", args.draws),
        ("minibatches_per_batch", args.minibatches_per_batch),
        ("wide_steps", args.wide_steps),
    ):
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            changes[name] = value
    size = dataclasses.replace(size, **changes)  # type: ignore[arg-type]
    try:
        parts = parse_parts(args.parts)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if size.minibatches_per_batch > base.learner.batch_size:
        raise SystemExit(
            f"--minibatches-per-batch {size.minibatches_per_batch} > learner.batch_size {base.learner.batch_size}"
        )
    source = Source(source.path, (*source.overrides, f"learner.mini_batches={size.minibatches_per_batch}"))
    plan = StudyPlan(k=base.loss.k, size=size, parts=parts)
    wide = _wide_source(args.wide_config, size, args.wide_set) if 4 in parts else None
    saved = _saved_study(args.out) if args.resume else None
    calibration = wide_calibration = None
    if saved is not None:  # the earlier run's lrs, not a new calibration (same study, same cells)
        calibration, wide_calibration = saved.get("calibration"), saved.get("wide_calibration")
    elif args.calibrate:
        calibration, wide_calibration = _calibrate(source, wide, plan, args.workers)
    if calibration is not None:
        source = Source(source.path, (*source.overrides, f"learner.lr={calibration['lr']:g}"))
    if wide is not None and wide_calibration is not None:
        wide = Source(wide.path, (*wide.overrides, f"learner.lr={wide_calibration['lr']:g}"))
        # forward KL overshoots above wide_forward_lr; below it, every wide row trains at the calibrated lr
        forward_lr = min(size.wide_forward_lr, float(wide_calibration["lr"]))
        size = dataclasses.replace(size, wide_forward_lr=forward_lr)
        plan = StudyPlan(k=base.loss.k, size=size, parts=parts)
    previous: dict[str, dict[str, Any]] = {}
    if saved is not None:
        from asyncopd.lab.study.runner import previous_jobs

        _check_resumable(saved, source, wide, size)
        previous = previous_jobs(saved)
    print(
        f"asyncopd study: parts {','.join(map(str, parts))}, {len(plan.cells())} cells × {size.steps} steps"
        + (f" (wide cells: {size.wide_steps})" if 4 in parts else "")
        + ", "
        f"seeds {list(size.seeds)}, {args.workers} worker(s) -> {args.out}",
        file=sys.stderr,
    )
    run = run_study(
        source,
        plan,
        args.workers,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        calibration=calibration,
        wide_source=wide,
        wide_calibration=wide_calibration,
        previous=previous,
        previous_seconds=float(saved["wall_seconds"]) if saved is not None else 0.0,
    )
    written = write_report(Results(plan, run), source, args.out, args.workers)
    print(f"wrote {written['markdown']} and {written['json']} ({run.wall_seconds / 60:.1f} min)")
    return 0


def _saved_study(out: Path) -> dict[str, Any]:
    saved = out / "study.json"
    if not saved.is_file():
        raise SystemExit(f"--resume: {saved} does not exist; run the study without --resume first")
    data: dict[str, Any] = json.loads(saved.read_text())
    return data


def _check_resumable(saved: dict[str, Any], toy: Source, wide: Source | None, size: StudySize) -> None:
    """Refuse to reuse cells of a study that ran other settings (cell keys name only the rows'
    overrides, staleness and seed: a config, lr or size change would mix two studies silently)."""
    ours = json.loads(json.dumps(dataclasses.asdict(size)))
    differ = sorted(k for k in ours.keys() | saved["size"].keys() if ours.get(k) != saved["size"].get(k))
    if differ:
        raise SystemExit(f"--resume: the saved study ran another size ({', '.join(differ)} differ); leave out --resume")
    if (toy.path, list(toy.overrides)) != (saved["config"], saved["overrides"]):
        raise SystemExit(
            f"--resume: the saved study ran -c {saved['config']} with {saved['overrides']}, this one "
            f"-c {toy.path} with {list(toy.overrides)}; leave out --resume"
        )
    theirs = saved.get("wide_source")
    if (
        wide is not None
        and theirs is not None
        and (wide.path, list(wide.overrides))
        != (
            theirs["path"],
            theirs["overrides"],
        )
    ):
        raise SystemExit(f"--resume: the saved study's wide world ran {theirs}, this one {wide}; leave out --resume")


def _calibrate(
    toy: Source, wide: Source | None, plan: StudyPlan, workers: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The toy's calibrated lr and, with part 4, the wide world's; with 2+ workers the wide world's
    calibration runs in a worker process beside the toy's."""
    import concurrent.futures
    import multiprocessing

    from asyncopd.lab.study.plan import WIDE
    from asyncopd.lab.study.runner import calibrate_lr, quiet_process

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    quiet_process()
    if wide is None:
        return calibrate_lr(toy, plan, progress=say), None
    rounds = plan.size.wide_calibration_rounds
    if workers <= 1:
        return calibrate_lr(toy, plan, progress=say), calibrate_lr(wide, plan, rounds=rounds, world=WIDE, progress=say)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=quiet_process) as pool:
        wide_job = pool.submit(calibrate_lr, wide, plan, rounds=rounds, world=WIDE)
        toy_result = calibrate_lr(toy, plan, progress=say)
        wide_result = wide_job.result()
    for r in wide_result["rounds"]:
        say(f"calibrate (wide): lr {r['lr']:.3g} -> median (log r)^2 per version {r['drift']:.3g}")
    return toy_result, wide_result


def _wide_source(path: str, size: StudySize, extra: list[str]) -> Source:
    """Part 4's config: the wide world with the study's mini-batches, the size's batch size and
    response cap when it sets them, then `--wide-set`."""
    from asyncopd.lab.study.runner import Source

    overrides = [f"learner.mini_batches={size.minibatches_per_batch}"]
    if size.wide_batch_size:
        overrides.append(f"learner.batch_size={size.wide_batch_size}")
    if size.wide_max_tokens:
        overrides.append(f"rollout.sampling.max_tokens={size.wide_max_tokens}")
    source = Source(path, (*overrides, *extra))
    config = source.config()
    missing = [m for m in (config.models.student, config.models.teacher) if not Path(m).is_dir()]
    if missing:
        raise SystemExit(
            f"asyncopd study: part 4 (wide) needs the wide world's models, missing: {', '.join(missing)}; "
            "build them with `make wide` (about 2 min), or leave part 4 out with --parts 1,2,3"
        )
    if size.minibatches_per_batch > config.learner.batch_size:
        raise SystemExit(
            f"--minibatches-per-batch {size.minibatches_per_batch} > the wide world's learner.batch_size "
            f"{config.learner.batch_size}"
        )
    return source
