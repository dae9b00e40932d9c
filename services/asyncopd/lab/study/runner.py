"""Runs a `StudyPlan`: every training cell, the gradient probe and the before-training baseline.

Each job builds its config with `load_config(path, base overrides + the cell's overrides +
seed=...)`, the path and base overrides of the cell's world (the toy's `-c`, part 4's
`--wide-config`), and runs in a worker process with one torch thread (or inline with `workers=1`), so a
cell's result depends only on its config: same seed, same numbers, whatever the worker count.
Worker processes keep the teacher and datasets of a config loaded between jobs.

It knows the harness, the probe and the plan; it writes nothing (the report does).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from asyncopd.config import RunConfig, load_config
from asyncopd.evaluation.greedy import evaluate
from asyncopd.lab.study.harness import StalenessHarness, StudyModels, load_study_models
from asyncopd.lab.study.held_out import held_out_stats
from asyncopd.lab.study.plan import TOY, WIDE, Cell, StudyPlan
from asyncopd.lab.study.probe import EstimatorSpec, probe_gradients
from asyncopd.models.loading import load_model


@dataclass(frozen=True)
class Source:
    """Where every cell's config comes from: a YAML path (None = defaults) and `--set` overrides."""

    path: str | None
    overrides: tuple[str, ...] = ()

    def config(self, *extra: str) -> RunConfig:
        return load_config(self.path, [*self.overrides, *extra])


_MODELS: dict[tuple[str, int, int], StudyModels] = {}


def quiet_process() -> None:
    """One torch thread and no progress bars: what every study process runs with."""
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _shared(config: RunConfig, test_size: int, held_out_size: int = 0) -> StudyModels:
    key = (
        config.models.model_dump_json()
        + config.task.model_dump_json()
        + config.teacher.model_dump_json()
        + config.rollout.model_dump_json(),  # the held-out set's sampling
        test_size,
        held_out_size,
    )
    if key not in _MODELS:
        _MODELS[key] = load_study_models(config, test_size, held_out_size)
    return _MODELS[key]


def train_cell(
    source: Source, cell: Cell, steps: int, test_size: int, *, evaluate_at_end: bool = True, held_out_size: int = 0
) -> dict[str, Any]:
    """Train one cell (from its world's `source`) and return its record (study.json's `cells` entries)."""
    overrides = (*cell.overrides, f"seed={cell.seed}")
    config = source.config(*overrides)
    harness = StalenessHarness(config, cell.staleness, _shared(config, test_size, held_out_size))
    result = harness.run(steps, evaluate_at_end=evaluate_at_end)
    return {"key": cell.key, "world": cell.world, "overrides": list(cell.overrides), **asdict(result)}


def median_drift(record: dict[str, Any]) -> float:
    """Median over a cell's batches t ≥ s (the ones exactly s versions stale) of the measured (log π_θ/μ)²."""
    drift = record.get("metrics", {}).get("drift") or []
    tail = [d for d in drift[int(record["staleness"]) :] if d is not None and math.isfinite(d)]
    return statistics.median(tail) if tail else math.nan


def calibrate_lr(
    source: Source,
    plan: StudyPlan,
    *,
    rounds: int = 3,
    world: str = TOY,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The lr at which one version of staleness moves the median (log π_θ/μ)² to `calibration_target`.

    Trains the plan's calibration row at s = 1 in `world` (`source` is that world's config) for
    the world's calibration batches; drift grows like lr² for small steps, so each round rescales
    lr by sqrt(target / measured). Returns the chosen lr and every round's (lr, drift).
    """
    say = progress or (lambda _msg: None)
    size = plan.size
    row = plan.calibration_row()
    lr = float(source.config().learner.lr)
    steps = size.wide_calibration_steps if world == WIDE else size.calibration_steps
    history: list[dict[str, float]] = []
    for _ in range(rounds):
        cell = Cell(row.overrides, 1, size.seeds[0], world)
        record = train_cell(
            Source(source.path, (*source.overrides, f"learner.lr={lr:.6g}")),
            cell,
            steps,
            size.test_size_of(world),
            evaluate_at_end=False,
        )
        drift = median_drift(record)
        history.append({"lr": lr, "drift": drift})
        say(
            f"calibrate ({world}): lr {lr:.3g} -> median (log r)^2 per version {drift:.3g} "
            f"(target {size.calibration_target:g})"
        )
        if not math.isfinite(drift) or drift <= 0:
            break
        lr = lr * math.sqrt(size.calibration_target / drift)
    return {"lr": float(f"{lr:.3g}"), "target": size.calibration_target, "rounds": history}


def probe_seed(
    source: Source,
    overrides: Sequence[str],
    estimators: Sequence[EstimatorSpec],
    *,
    seed: int,
    draws: int,
    test_size: int,
) -> dict[str, Any]:
    """Part 3a on the batch of one seed: {label: stats}."""
    config = source.config(*overrides, f"seed={seed}")
    stats = probe_gradients(config, _shared(config, test_size), estimators, draws)
    return {"seed": seed, "stats": {label: s.as_dict() for label, s in stats.items()}}


def baseline(source: Source, test_size: int, held_out_size: int = 0, ks: Sequence[int] = ()) -> dict[str, Any]:
    """Greedy test accuracy of the initial student and of the teacher (the bounds of every cell);
    with a held-out set, the initial student's dense KL(π‖p) and both models' top-k missing mass."""
    config = source.config()
    shared = _shared(config, test_size, held_out_size)
    max_tokens = config.rollout.sampling.max_tokens
    student = load_model(config.models.student, config.models.dtype, config.learner.device)
    out: dict[str, Any] = {
        "student_accuracy": evaluate(student, shared.tokenizer, shared.test_items, max_tokens).accuracy,
        "teacher_accuracy": evaluate(shared.teacher, shared.tokenizer, shared.test_items, max_tokens).accuracy,
        "test_size": len(shared.test_items),
        "vocab_size": int(student.config.vocab_size),
    }
    if shared.held_out:
        out["held_out"] = held_out_stats(student, shared.teacher, shared.held_out, ks)
        out["held_out_response_tokens"] = [r.num_tokens for r in shared.held_out]
    return out


def _cost(cell: Cell) -> float:
    """Rough relative cost, to start the longest cells first (a wide cell outweighs any toy one)."""
    k = next((int(o.split("=")[1]) for o in cell.overrides if o.startswith("loss.k=")), 1)
    return k + 0.1 * cell.staleness + (1000.0 if cell.world == WIDE else 0.0)


@dataclass
class StudyRun:
    """What `run_study` measured (raw, per cell and per seed)."""

    cells: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    baseline: dict[str, Any]
    wall_seconds: float
    calibration: dict[str, Any] | None = None
    """`calibrate_lr`'s record when `--calibrate` chose the lr (else None)."""
    wide_baseline: dict[str, Any] | None = None
    """`baseline` of the wide world when part 4 ran (with the teachers' and students' top-K missing mass)."""
    wide_source: Source | None = None
    """Where part 4's cells came from."""
    wide_calibration: dict[str, Any] | None = None
    """`calibrate_lr`'s record for the wide world when part 4's lr was calibrated (else None)."""
    reused: int = 0
    """Jobs (cells, probes, baselines) taken from an earlier run's study.json (`--resume`), not run again."""


def run_study(
    source: Source,
    plan: StudyPlan,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    calibration: dict[str, Any] | None = None,
    *,
    wide_source: Source | None = None,
    wide_calibration: dict[str, Any] | None = None,
    previous: Mapping[str, dict[str, Any]] | None = None,
    previous_seconds: float = 0.0,
) -> StudyRun:
    """Run every cell (and, with part 3, the probe) of `plan`; `workers` processes in parallel.

    `wide_source` is where part 4's cells come from (required when it is selected). `previous`
    holds jobs an earlier run of the same study finished (`previous_jobs`), by job name: they are
    taken as they are, and `previous_seconds` (that run's wall time) is added to this one's."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    if 4 in plan.parts and wide_source is None:
        raise ValueError("part 4 (wide) needs wide_source, the wide world's config")
    sources = {TOY: source, WIDE: wide_source or source}
    cells = sorted(plan.cells(), key=_cost, reverse=True)
    estimators = [EstimatorSpec(label, kind, k) for label, kind, k in plan.probe_estimators()]
    size = plan.size
    held = size.held_out_size
    # (name, job): module-level functions bound with functools.partial, so they pickle to workers
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("baseline", functools.partial(baseline, source, size.test_size, held))
    ]
    if 4 in plan.parts:
        jobs.append(
            (
                "baseline wide",
                functools.partial(baseline, sources[WIDE], size.wide_test_size, held, size.wide_topk_sizes),
            )
        )
    if 3 in plan.parts:
        overrides = plan.probe_overrides()
        jobs += [
            (
                f"probe seed={seed}",
                functools.partial(
                    probe_seed, source, overrides, estimators, seed=seed, draws=size.draws, test_size=size.test_size
                ),
            )
            for seed in size.seeds
        ]
    jobs += [
        (
            cell.key,
            functools.partial(
                train_cell,
                sources[cell.world],
                cell,
                size.steps_of(cell.world),
                size.test_size_of(cell.world),
                held_out_size=held,
            ),
        )
        for cell in cells
    ]
    previous = previous or {}
    results: dict[str, dict[str, Any]] = {name: previous[name] for name, _ in jobs if name in previous}
    jobs = [(name, job) for name, job in jobs if name not in results]
    reused = len(results)
    if reused:
        say(f"resume: {reused} jobs taken from the earlier run, {len(jobs)} to run")
    done = 0

    def record(name: str, value: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        results[name] = value
        extra = f" accuracy={value['accuracy']:.3f} ({value['seconds']:.0f}s)" if "accuracy" in value else ""
        say(f"[{done}/{len(jobs)}] {name}{extra}  t={time.perf_counter() - start:.0f}s")

    if workers <= 1:
        if jobs:
            quiet_process()
        for name, job in jobs:
            record(name, job())
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=quiet_process) as pool:
            futures = {pool.submit(job): name for name, job in jobs}
            for future in concurrent.futures.as_completed(futures):
                record(futures[future], future.result())
    return StudyRun(
        cells=[results[cell.key] for cell in plan.cells()],
        probes=[results[f"probe seed={seed}"] for seed in size.seeds] if 3 in plan.parts else [],
        baseline=results["baseline"],
        wall_seconds=previous_seconds + time.perf_counter() - start,
        calibration=calibration,
        wide_baseline=results.get("baseline wide"),
        wide_source=wide_source if 4 in plan.parts else None,
        wide_calibration=wide_calibration,
        reused=reused,
    )


def previous_jobs(saved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """An earlier study.json's finished jobs by the names `run_study` gives them."""
    jobs: dict[str, dict[str, Any]] = {c["key"]: c for c in saved.get("cells") or []}
    jobs.update({f"probe seed={p['seed']}": p for p in saved.get("probes") or []})
    for name, field in (("baseline", "baseline"), ("baseline wide", "wide_baseline")):
        if saved.get(field):
            jobs[name] = saved[field]
    return jobs
