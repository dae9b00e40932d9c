"""`asyncopd run`: the whole pipeline on one machine, start to report.

The run is `LocalRun.stages()`, a declared list read top to bottom: the run's own directory
(`runs/<name>/<timestamp>/` by default, see `rundir`; an earlier run is never deleted) →
evaluate the student (and teacher) before training → Redis (reused or private) → the resolved config the children read
→ cache → learner → teachers → rollout replicas (each a `python -m asyncopd.cli serve ...`
child on loopback with free ports, started only once what it depends on answers its gRPC
health check) → train (poll progress until the learner reaches its last version) → drain (stop
the producers, take the cache's final accounting, stop the learner — it checkpoints on
SIGTERM — and the cache) → evaluate the trained student → report and plots. A stage that
raises ends the run; every process started so far is then stopped by handle, newest first.

A resumed run (`LaunchOptions.resume`) goes back into its directory: the learner starts from
its newest checkpoint and appends to the same step log (versions go on from the checkpoint's);
the services start afresh under a new Redis key prefix, so the cache re-admits prompts cleanly
rather than trusting claims of processes that are gone. Its report accounts for the resumed
segment; its plots show the whole run.

The children read one resolved config file written into the run's output dir (no password
in it: the password travels in the environment). Every child logs to `<output_dir>/logs/`.
This module orchestrates; what each service does is its own package's business.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import yaml
from rich.console import Console
from rich.live import Live

from asyncopd.config import RunConfig, config_from_dict
from asyncopd.evaluation.watcher import EVAL_LOG_NAME, EvalSettings
from asyncopd.lab.launch.accuracy import evaluate_accuracy, final_student_dir
from asyncopd.lab.launch.child_config import (
    RESOLVED_CONFIG_NAME,
    STEP_LOG_NAME,  # also imported from here by the chaos harness
    Ports,
    child_env,
    pick_ports,
    resolved_config_data,
)
from asyncopd.lab.launch.plots import write_report_plots
from asyncopd.lab.launch.probe import RunProbe
from asyncopd.lab.launch.processes import ChildProcess, Supervisor
from asyncopd.lab.launch.progress import Snapshot, progress_table
from asyncopd.lab.launch.redis_server import RedisEndpoint, delete_prefix, ensure_redis, start_private_redis
from asyncopd.lab.launch.report import build_report, report_table, write_report
from asyncopd.lab.launch.rundir import RUN_CONFIG_NAME, ResumePoint, plan_run_dir, point_latest, prepare_run_dir
from asyncopd.lab.launch.services import Services
from asyncopd.lab.launch.steplog import StepLogReader, read_step_log
from asyncopd.lab.prometheus_local import INSTALL_HINT, LocalPrometheus, start_for_run


class RunStopped(RuntimeError):
    """The launcher was asked to stop (SIGTERM) before the run finished."""


@dataclass
class LaunchOptions:
    """How the launcher behaves (not part of the run config: nothing a service reads)."""

    report_path: Path | None = None
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 20.0
    max_wall_s: float | None = None
    poll_s: float = 1.0
    evaluate: bool = True
    evaluate_teacher: bool = True
    # Evaluate only the trained student (e.g. the later runs of a benchmark on one student).
    skip_eval_before: bool = False
    live: bool = True
    plots: bool = True
    # Start a local Prometheus scraping every service (when the binary is installed).
    prometheus: bool = False
    python: str = sys.executable
    # Always start a private redis-server (never reuse the configured one), e.g. to restart it.
    private_redis: bool = False
    # With private_redis: keep an fsync-always append-only file here (a restart loses nothing).
    redis_persistence_dir: Path | None = None
    # Called once per progress tick with the run and the latest snapshot (fault injection),
    # the last time when the learner has finished (before anything is stopped). Returning True
    # ends the run at that tick, before learner.steps: the learner is stopped first (SIGTERM:
    # it finishes its step and writes a checkpoint), then the rest as at a normal end.
    on_tick: Callable[[LocalRun, Snapshot], bool] | None = None
    # Continue this run (its directory and newest checkpoint) instead of starting a new one.
    resume: ResumePoint | None = None
    # Run the evaluator process (asyncopd.evaluation.watcher) beside the learner: every
    # checkpoint sampled n times per test prompt, Avg@n and pass@k into eval_steps.jsonl.
    sampled_eval: EvalSettings | None = None


@dataclass(frozen=True)
class Stage:
    """One named step of a local run; `run()` does it, reading and writing the run's state."""

    name: str
    run: Callable[[], None]


@dataclass
class RunFindings:
    """What the stages measure on the way, for the stages after them (the report at the end)."""

    accuracy_before: float | None = None
    accuracy_teacher: float | None = None
    accuracy_after: float | None = None
    wall_start: float = 0.0  # Unix time training began: the plots' t0
    wall_seconds: float = 0.0  # training, from every service serving to the learner's end
    last_snapshot: Snapshot | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # busy seconds per pipeline stage
    final_stats: dict[str, Any] | None = None  # the cache's accounting once the producers stopped
    report: dict[str, Any] | None = None
    records_before: int = 0  # step-log records an earlier segment of a resumed run wrote


class LocalRun:
    """One local run of the pipeline; `execute()` runs `stages()` and returns the report."""

    def __init__(self, config: RunConfig, options: LaunchOptions | None = None, console: Console | None = None):
        self.options = options or LaunchOptions()
        resume = self.options.resume
        if resume is not None:
            learner = config.learner.model_copy(update={"resume": True})
            config = config.model_copy(update={"learner": learner})
        self.config = config
        self.console = console or Console(stderr=True)
        # `output_dir` is a template (`{name}`, `{timestamp}`); a resumed run goes back into its own.
        self.out_dir = resume.run_dir.resolve() if resume is not None else plan_run_dir(config.output_dir, config.name)
        self.run_id = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.key_prefix = f"{config.redis.key_prefix}:{self.run_id}"
        self.supervisor = Supervisor(self.out_dir / "logs", env=child_env(config))
        self.services = Services(
            self.supervisor,
            self.out_dir / RESOLVED_CONFIG_NAME,
            config.tls,
            python=self.options.python,
            startup_timeout_s=self.options.startup_timeout_s,
            process_table=self.out_dir / "processes.json",
        )
        self.steps = StepLogReader(self.out_dir / STEP_LOG_NAME)
        self.found = RunFindings()
        # Monotonic time each stage began (startup and training are measured between them).
        self.stage_started: dict[str, float] = {}
        # Set by the stages that create them; None before.
        self.redis: RedisEndpoint | None = None
        self.ports: Ports | None = None
        self.probe: RunProbe | None = None
        self._prometheus: LocalPrometheus | None = None
        self._stop_requested = False

    # -- the run -----------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """The run, in order. A stage that raises ends it, and `execute` stops every process
        started so far, newest first."""
        return [
            Stage("run dir", self._prepare_run_dir),
            Stage("evaluate before", self._evaluate_before),
            Stage("redis", self._start_redis),
            Stage("child config", self._write_child_config),
            Stage("cache", self._start_cache),
            Stage("learner", self._start_learner),
            # Teachers first, then rollout replicas: a replica generates as soon as it serves,
            # so starting the producers last keeps the measured training wall time honest.
            Stage("teachers", self._start_teachers),
            Stage("rollouts", self._start_rollouts),
            Stage("evaluator", self._start_evaluator),
            Stage("prometheus", self._start_prometheus),
            Stage("train", self._train),
            Stage("drain", self._drain),
            Stage("evaluate after", self._evaluate_after),
            Stage("report", self._report),
        ]

    def execute(self) -> dict[str, Any]:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._execute()
        finally:
            if self._prometheus is not None:
                self._prometheus.stop()
            self.supervisor.stop_all(self.options.stop_grace_s)
            signal.signal(signal.SIGTERM, previous)
            self._forget_run_keys()

    def _execute(self) -> dict[str, Any]:
        for stage in self.stages():
            self.stage_started[stage.name] = time.monotonic()
            stage.run()
        if self.found.report is None:
            raise RuntimeError("the run's stages ended without a report")
        return self.found.report

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Like Ctrl-C: unwind from wherever the launcher is, so `execute` stops every child.
        # Only once, so a second SIGTERM cannot interrupt that clean-up.
        if not self._stop_requested:
            self._stop_requested = True
            raise RunStopped("stopped by SIGTERM before the run finished")

    def _forget_run_keys(self) -> None:
        """In a shared Redis, delete this run's keys (its own prefix), however the run ended."""
        if self.redis is None or self.redis.private:
            return
        try:
            delete_prefix(self.config.redis, self.redis.url, self.key_prefix)
        except redis.RedisError as exc:
            self.console.print(f"[yellow]could not delete this run's Redis keys ({self.key_prefix}:*): {exc}")

    # -- the stages, in their order ----------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        """A new run: its own directory (an earlier run in a fixed one is moved aside), and the
        user's config kept for `--resume`. A resumed run: its directory as it was."""
        resume = self.options.resume
        if resume is not None:
            self.found.records_before = len(read_step_log(self.steps.path))
            if (self.out_dir.parent / "latest").is_symlink():
                point_latest(self.out_dir)
            self.console.print(
                f"resuming {self.out_dir} from its checkpoint at version {resume.version} "
                f"({self.found.records_before} step-log records so far)"
            )
            return
        moved = prepare_run_dir(self.out_dir, self.config.output_dir)
        if moved is not None:
            self.console.print(f"an earlier run in {self.out_dir} was moved to {moved}")
        data = self.config.model_dump(mode="json")
        data["redis"]["password"] = None  # travels in the environment, never in a file
        (self.out_dir / RUN_CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))
        self.console.print(f"run directory: {self.out_dir}")

    def _evaluate_before(self) -> None:
        config, opts, found = self.config, self.options, self.found
        if not opts.evaluate or opts.skip_eval_before or opts.resume is not None:
            return
        t = time.monotonic()
        self.console.print(f"evaluating the student ({config.models.student}) before training ...")
        found.accuracy_before = evaluate_accuracy(config.models.student, config)
        if opts.evaluate_teacher:
            found.accuracy_teacher = evaluate_accuracy(config.models.teacher, config)
        self.console.print(
            f"accuracy before: student {found.accuracy_before:.3f}"
            + (f", teacher {found.accuracy_teacher:.3f}" if found.accuracy_teacher is not None else "")
            + f" ({time.monotonic() - t:.1f}s)"
        )

    def _start_redis(self) -> None:
        opts = self.options
        if opts.private_redis:
            self.redis = start_private_redis(
                self.supervisor, self.config.redis, persistence_dir=opts.redis_persistence_dir
            )
        else:
            self.redis = ensure_redis(self.supervisor, self.config.redis)
        self.services.write_process_table()
        self.console.print(f"redis: {'private server ' if self.redis.private else ''}{self.redis.url}")

    def _write_child_config(self) -> None:
        """Choose the ports and write the one config file every child reads."""
        assert self.redis is not None
        ports = pick_ports(self.config)
        data = resolved_config_data(self.config, self.out_dir, self.redis.url, self.key_prefix, ports)
        config_path = self.services.config_path
        config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        config_from_dict(data, str(config_path))  # the children must be able to load it
        self.ports = ports
        self.probe = RunProbe(data["endpoints"], self.steps, self.config.learner.steps, self.config.tls)

    def _start_cache(self) -> None:
        assert self.ports is not None
        self.services.start("cache", "cache", self.ports.cache, self.ports.metrics["cache"])
        self.services.wait("cache")

    def _start_learner(self) -> None:
        assert self.ports is not None
        self.services.start("learner", "learner", self.ports.learner, self.ports.metrics["learner"])
        self.services.wait("learner")

    def _start_teachers(self) -> None:
        assert self.ports is not None
        self.services.start_replicas("teacher", self.ports.teachers, self.ports.metrics)

    def _start_rollouts(self) -> None:
        assert self.ports is not None
        self.services.start_replicas("rollout", self.ports.rollouts, self.ports.metrics)

    def _start_evaluator(self) -> None:
        """The sampled evaluator, a child reading checkpoints only: it cannot block the learner."""
        s = self.options.sampled_eval
        if s is None:
            return
        argv = [self.options.python, "-m", "asyncopd.evaluation.watcher", "-c", str(self.services.config_path)]
        argv += ["--n", str(s.n), "--k", ",".join(map(str, s.ks)), "--poll-s", str(s.poll_s), "--device", s.device]
        self.supervisor.start("evaluator", argv)
        self.services.write_process_table()

    def _start_prometheus(self) -> None:
        if not self.options.prometheus:
            return
        self._prometheus = start_for_run(self.config.metrics, self.services.metrics_urls, self.out_dir)
        self.console.print(
            f"prometheus: {self._prometheus.url} (data kept in {self.out_dir / 'prometheus'})"
            if self._prometheus is not None
            else f"[yellow]{INSTALL_HINT}"
        )

    def _train(self) -> None:
        """Poll every `poll_s` until the learner has its last version (or `on_tick` ends the run)."""
        assert self.probe is not None
        opts, steps_total, found = self.options, self.config.learner.steps, self.found
        ready = self.stage_started["train"]
        self.console.print(
            f"all services serving after {ready - self.stage_started['cache']:.1f}s; training {steps_total} steps"
        )
        found.wall_start = time.time()
        live = Live(console=self.console, refresh_per_second=2) if opts.live else None
        with live if live is not None else contextlib.nullcontext():
            next_line_s = 0.0  # without the live table: one progress line every 30 s
            while True:
                self.supervisor.check()
                snap, finished = self.probe.tick(ready, self.services.metrics_urls, found.accuracy_before)
                found.last_snapshot = snap
                ended_early = opts.on_tick is not None and opts.on_tick(self, snap) and not finished
                if live is not None:
                    live.update(progress_table(snap))
                elif snap.elapsed_s >= next_line_s:
                    self.console.print(f"step {snap.version}/{steps_total} after {snap.elapsed_s:.0f}s")
                    next_line_s += 30.0
                if self._training_over(snap, finished, ended_early, ready):
                    break
                time.sleep(opts.poll_s)
        found.wall_seconds = time.monotonic() - ready
        if found.last_snapshot is not None and not opts.live:
            self.console.print(progress_table(found.last_snapshot))

    def _training_over(self, snap: Snapshot, finished: bool, ended_early: bool, ready: float) -> bool:
        """True once the learner is done, or `on_tick` ended the run (the learner is then stopped
        first); TimeoutError past `max_wall_s`."""
        if finished:
            return True
        if ended_early:
            self.console.print(f"run ended at version {snap.version} by its on_tick hook")
            self.supervisor.child("learner").stop(self.options.stop_grace_s)
            return True
        max_wall_s = self.options.max_wall_s
        if max_wall_s is not None and time.monotonic() - ready > max_wall_s:
            raise TimeoutError(
                f"the run did not finish within {max_wall_s:.0f}s "
                f"(version {snap.version}/{self.config.learner.steps}); logs in {self.supervisor.log_dir}"
            )
        return False

    def _drain(self) -> None:
        """Read the busy seconds, stop the producers, take the cache's final accounting, stop the rest."""
        assert self.probe is not None
        self.found.stage_seconds = self.probe.busy_seconds(self.services.metrics_urls)
        grace = self.options.stop_grace_s
        for child in reversed(self.supervisor.children):
            if child.name.startswith(("rollout-", "teacher-")) or child.name == "evaluator":
                child.stop(grace)
        self.found.final_stats = self.probe.final_stats()
        for child in reversed(self.supervisor.children):
            if child.name in ("learner", "cache"):
                child.stop(grace)
        self.steps.poll()
        if self.found.final_stats is None:
            raise RuntimeError("the cache's final accounting could not be read; the report would be incomplete")

    def _evaluate_after(self) -> None:
        self._evaluate_final_sampled()
        if not self.options.evaluate:
            return
        student = final_student_dir(self.out_dir / "checkpoints")
        if student is None:
            accs = [r.accuracy for r in self.steps.records if r.accuracy is not None]
            self.console.print("[yellow]no final student checkpoint found; using the learner's last evaluation")
            self.found.accuracy_after = accs[-1] if accs else None
            return
        self.console.print(f"evaluating the trained student ({student}) ...")
        self.found.accuracy_after = evaluate_accuracy(str(student), self.config)

    def _evaluate_final_sampled(self) -> None:
        """The evaluator stopped with the producers; the learner's final checkpoint came after."""
        s = self.options.sampled_eval
        if s is None:
            return
        from asyncopd.evaluation.watcher import Evaluator
        from asyncopd.lab.launch.rundir import CHECKPOINTS

        config = self.config.model_copy(update={"output_dir": str(self.out_dir)})
        config = config.model_copy(
            update={"learner": config.learner.model_copy(update={"checkpoint_dir": str(self.out_dir / CHECKPOINTS)})}
        )
        evaluator = Evaluator(config, s, self.out_dir / EVAL_LOG_NAME)
        done = self._sampled_records()
        evaluator.last_version = done[-1]["version"] if done else None
        record = evaluator.poll()
        if record is not None:
            self.console.print(f"sampled evaluation of version {record['version']}: {record}")

    def _sampled_records(self) -> list[dict[str, Any]]:
        path = self.out_dir / EVAL_LOG_NAME
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _report(self) -> None:
        found, opts = self.found, self.options
        assert found.final_stats is not None and self.redis is not None
        # The report accounts for this segment (the cache's counts start afresh on a resume);
        # the plots show every step the run has logged.
        report = build_report(
            self.config,
            found.final_stats,
            self.steps.records[found.records_before :],
            wall_seconds=found.wall_seconds,
            accuracy_before=found.accuracy_before,
            accuracy_after=found.accuracy_after,
            accuracy_teacher=found.accuracy_teacher,
            extra={
                "run_id": self.run_id,
                "startup_seconds": round(self.stage_started["train"] - self.stage_started["cache"], 3),
                "stage_seconds": found.stage_seconds,
                "redis": "private" if self.redis.private else "shared",
                "output_dir": str(self.out_dir),
                "resumed_from_version": None if opts.resume is None else opts.resume.version,
            },
        )
        if opts.sampled_eval is not None:
            report["sampled_eval"] = self._sampled_records()
        report_path = opts.report_path or self.out_dir / "report.json"
        if opts.plots:
            t0 = found.wall_start if opts.resume is None else None  # None: the run's first logged step
            plots = write_report_plots(report, self.steps.records, report_path.parent, t0=t0)
            report["plots"] = [str(p) for p in plots]
        write_report(report, report_path)
        self.console.print(report_table(report))
        self.console.print(f"report: {report_path}")
        found.report = report

    # -- for fault injection (`LaunchOptions.on_tick`) ---------------------------------------

    def add_replica(self, service: str) -> ChildProcess:
        """Start one more `rollout` or `teacher` replica mid-run, on new ports; returns it once serving."""
        if self.ports is None:
            raise ValueError(f"cannot add a {service!r} replica before the run has started its services")
        return self.services.add_replica(service)

    def restart_child(self, name: str) -> ChildProcess:
        """Start a stopped/killed child again with its own argv (same ports); wait until it serves."""
        return self.services.restart(name)


def run_pipeline(
    config: RunConfig, options: LaunchOptions | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run the pipeline locally and return the report (also written to disk)."""
    return LocalRun(config, options, console).execute()
