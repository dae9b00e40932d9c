"""`asyncopd run`: the whole pipeline on one machine, start to report.

Order of events: Redis (reused or private) → evaluate the student (and teacher) before
training → cache → learner → teachers and rollout replicas, each a `python -m asyncopd.cli
serve ...` child on loopback with free ports, started only once what it depends on answers
its gRPC health check → poll progress until the learner reaches its last version → stop the
producers, take the cache's final accounting, stop the learner (it checkpoints on SIGTERM)
and the cache → evaluate the trained student → report and plots.

The children read one resolved config file written into the run's output dir (no password
in it: the password travels in the environment). Every child logs to `<output_dir>/logs/`.
This module orchestrates; what each service does is its own package's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import redis
import yaml
from rich.console import Console
from rich.live import Live

from asyncopd.config import RunConfig, config_from_dict
from asyncopd.config.loader import REDIS_PASSWORD_ENV
from asyncopd.lab.launch.accuracy import evaluate_accuracy, final_student_dir
from asyncopd.lab.launch.health import wait_serving
from asyncopd.lab.launch.plots import write_plots
from asyncopd.lab.launch.ports import free_port
from asyncopd.lab.launch.processes import ChildProcess, Supervisor
from asyncopd.lab.launch.progress import RateMeter, Snapshot, progress_table, scrape_counter, scrape_sums
from asyncopd.lab.launch.redis_server import RedisEndpoint, delete_prefix, ensure_redis, start_private_redis
from asyncopd.lab.launch.report import build_report, report_table, write_report
from asyncopd.lab.launch.steplog import StepLogReader
from asyncopd.lab.prometheus_local import INSTALL_HINT, LocalPrometheus, start_for_run
from asyncopd.wire import rpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.learner_client import LearnerClient

log = logging.getLogger(__name__)

STEP_LOG_NAME = "learner_steps.jsonl"
RESOLVED_CONFIG_NAME = "config.yaml"


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


@dataclass
class Ports:
    """Loopback ports of every server the run starts, chosen up front."""

    cache: int
    learner: int
    teachers: list[int]
    rollouts: list[int]
    metrics: dict[str, int] = field(default_factory=dict)


def pick_ports(config: RunConfig) -> Ports:
    names = (
        ["cache", "learner"]
        + [f"teacher-{i}" for i in range(config.teacher.replicas)]
        + [f"rollout-{i}" for i in range(config.rollout.replicas)]
    )
    # Picked one at a time with the sockets closed in between, so avoid duplicates by hand.
    taken: set[int] = set()

    def pick() -> int:
        while True:
            port = free_port()
            if port not in taken:
                taken.add(port)
                return port

    metrics = {name: pick() for name in names}
    return Ports(
        cache=pick(),
        learner=pick(),
        teachers=[pick() for _ in range(config.teacher.replicas)],
        rollouts=[pick() for _ in range(config.rollout.replicas)],
        metrics=metrics,
    )


def resolved_config_data(
    config: RunConfig, out_dir: Path, redis_url: str, key_prefix: str, ports: Ports
) -> dict[str, Any]:
    """The config every child reads: endpoints and ports filled in, paths absolute, no password."""
    data = config.model_dump(mode="json")
    data["redis"]["password"] = None
    data["redis"]["url"] = redis_url
    data["redis"]["key_prefix"] = key_prefix
    data["output_dir"] = str(out_dir)
    data["endpoints"]["cache"] = f"127.0.0.1:{ports.cache}"
    data["endpoints"]["learner"] = f"127.0.0.1:{ports.learner}"
    data["cache"]["server"]["port"] = ports.cache
    data["cache"]["server"]["metrics_port"] = ports.metrics["cache"]
    data["learner"]["server"]["port"] = ports.learner
    data["learner"]["server"]["metrics_port"] = ports.metrics["learner"]
    data["learner"]["checkpoint_dir"] = str(out_dir / "checkpoints")
    if "step_log" in data["learner"]:
        data["learner"]["step_log"] = str(out_dir / STEP_LOG_NAME)
    for section in ("cache", "learner", "teacher", "rollout"):
        data[section]["server"]["host"] = "127.0.0.1"
    return data


class LocalRun:
    """One local run of the pipeline; `execute()` returns the report."""

    def __init__(self, config: RunConfig, options: LaunchOptions | None = None, console: Console | None = None):
        self.config = config
        self.options = options or LaunchOptions()
        self.console = console or Console(stderr=True)
        self.out_dir = Path(config.output_dir).resolve()
        self.run_id = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.key_prefix = f"{config.redis.key_prefix}:{self.run_id}"
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        # Several torch processes share the machine; without a cap each would spawn one thread
        # per core and they would thrash each other on a small box.
        workers = config.rollout.replicas + config.teacher.replicas + 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        env.pop(REDIS_PASSWORD_ENV, None)
        if config.redis.password is not None:
            env[REDIS_PASSWORD_ENV] = config.redis.password.get_secret_value()
        self.supervisor = Supervisor(self.out_dir / "logs", env=env)
        self.redis: RedisEndpoint | None = None
        self._prometheus: LocalPrometheus | None = None
        self.steps = StepLogReader(self.out_dir / STEP_LOG_NAME)
        self._stop_requested = False
        self._accuracy_before: float | None = None
        self._endpoints: dict[str, str] = {}
        self._cache: CacheClient | None = None
        self._learner: LearnerClient | None = None
        self.config_path: Path | None = None
        self.ports: Ports | None = None
        self.metrics_urls: dict[str, str] = {}

    # -- children ----------------------------------------------------------------------------

    def _serve(self, service: str, name: str, config_path: Path, overrides: list[str]) -> ChildProcess:
        argv = [self.options.python, "-m", "asyncopd.cli", "serve", service, "-c", str(config_path), "--name", name]
        for item in overrides:
            argv += ["--set", item]
        child = self.supervisor.start(name, argv)
        self._write_process_table()
        return child

    def _write_process_table(self) -> None:
        """`processes.json`: each child's pid and log, for whoever needs to look at one."""
        table = [{"name": c.name, "pid": c.pid, "log": str(c.log_path)} for c in self.supervisor.children]
        (self.out_dir / "processes.json").write_text(json.dumps(table, indent=2) + "\n")

    def _start_services(self, config_path: Path, ports: Ports) -> dict[str, str]:
        """Start every service in dependency order; returns {child name: metrics URL}."""
        timeout = self.options.startup_timeout_s
        tls = self.config.tls
        cache = self._serve("cache", "cache", config_path, [])
        wait_serving(f"127.0.0.1:{ports.cache}", cache, timeout, tls=tls)
        learner = self._serve("learner", "learner", config_path, [])
        wait_serving(f"127.0.0.1:{ports.learner}", learner, timeout, tls=tls)
        # Teachers first, then rollout replicas: a replica generates as soon as it serves, so
        # starting the producers last keeps the measured training wall time honest.
        for service, service_ports in (("teacher", ports.teachers), ("rollout", ports.rollouts)):
            waiting: list[tuple[str, ChildProcess]] = []
            for i, port in enumerate(service_ports):
                name = f"{service}-{i}"
                overrides = [f"{service}.server.port={port}", f"{service}.server.metrics_port={ports.metrics[name]}"]
                waiting.append((f"127.0.0.1:{port}", self._serve(service, name, config_path, overrides)))
            for address, child in waiting:
                wait_serving(address, child, timeout, tls=tls)
        return {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.metrics.items()}

    def add_replica(self, service: str) -> ChildProcess:
        """Start one more `rollout` or `teacher` replica mid-run, on new ports; returns it once serving."""
        if service not in ("rollout", "teacher") or self.config_path is None or self.ports is None:
            raise ValueError(f"cannot add a {service!r} replica (only rollout/teacher, once the run has started)")
        taken = {c.name for c in self.supervisor.children}
        index = next(i for i in range(len(taken) + 1) if f"{service}-{i}" not in taken)
        name = f"{service}-{index}"
        port, metrics_port = free_port(), free_port()
        while metrics_port == port:
            metrics_port = free_port()
        overrides = [f"{service}.server.port={port}", f"{service}.server.metrics_port={metrics_port}"]
        child = self._serve(service, name, self.config_path, overrides)
        wait_serving(f"127.0.0.1:{port}", child, self.options.startup_timeout_s, tls=self.config.tls)
        self.metrics_urls[name] = f"http://127.0.0.1:{metrics_port}/metrics"
        return child

    def restart_child(self, name: str) -> ChildProcess:
        """Start a stopped/killed child again with its own argv (same ports); wait until it serves."""
        child = self.supervisor.restart(name)
        self._write_process_table()
        if name != "redis":  # Redis has no gRPC health check: the caller waits for it
            address = self._address_of(name)
            wait_serving(address, child, self.options.startup_timeout_s, tls=self.config.tls)
        return child

    def _address_of(self, name: str) -> str:
        assert self.ports is not None
        if name in ("cache", "learner"):
            return self._endpoints[name]
        child = self.supervisor.child(name)
        for i, arg in enumerate(child.argv):
            if arg == "--set" and child.argv[i + 1].split("=", 1)[0].endswith(".server.port"):
                return f"127.0.0.1:{child.argv[i + 1].split('=', 1)[1]}"
        raise KeyError(f"no port known for {name}")

    def _stage_seconds(self, metrics_urls: Mapping[str, str]) -> dict[str, float]:
        """Busy seconds of each pipeline stage, summed over replicas (from their /metrics)."""
        stages: dict[str, float] = {}
        for name, url in metrics_urls.items():
            if name.startswith("rollout-"):
                found = scrape_sums(url, "asyncopd_rollout_generation_seconds")
                if found:
                    stages["rollout"] = stages.get("rollout", 0.0) + sum(found.values())
            elif name.startswith("teacher-"):
                found = scrape_sums(url, "asyncopd_teacher_scoring_seconds")
                if found:
                    stages["teacher"] = stages.get("teacher", 0.0) + sum(found.values())
            elif name == "learner":
                found = scrape_sums(url, "asyncopd_learner_step_phase_seconds", by="phase")
                for phase, seconds in (found or {}).items():
                    stages[f"learner_{phase}"] = seconds
        return {k: round(v, 3) for k, v in stages.items()}

    def _stop_producers_then_rest(self) -> dict[str, Any] | None:
        """Stop rollouts and teachers, read the final accounting, then stop the rest."""
        grace = self.options.stop_grace_s
        for child in reversed(self.supervisor.children):
            if child.name.startswith(("rollout-", "teacher-")):
                child.stop(grace)
        final: dict[str, Any] | None = None
        try:
            final = self._cache_client().stats()
        except grpc.RpcError as err:
            log.warning("final cache stats unavailable: %s", err)
        for child in reversed(self.supervisor.children):
            if child.name in ("learner", "cache"):
                child.stop(grace)
        return final

    # -- polling -----------------------------------------------------------------------------

    def _cache_client(self) -> CacheClient:
        if self._cache is None:
            self._cache = CacheClient(rpc.channel(self._endpoints["cache"], tls=self.config.tls), timeout_s=5.0)
        return self._cache

    def _learner_client(self) -> LearnerClient:
        if self._learner is None:
            self._learner = LearnerClient(rpc.channel(self._endpoints["learner"], tls=self.config.tls), timeout_s=5.0)
        return self._learner

    def _poll(
        self, started: float, metrics_urls: Mapping[str, str], rollout_rate: RateMeter, train_rate: RateMeter
    ) -> tuple[Snapshot, bool]:
        """One progress tick; returns (snapshot, learner finished)."""
        steps_total = self.config.learner.steps
        snap = Snapshot(elapsed_s=time.monotonic() - started, steps_total=steps_total)
        finished = False
        try:
            snap.cache = self._cache_client().stats()
            snap.version = int(snap.cache.get("learner_version", 0))
        except grpc.RpcError as err:
            snap.notes.append(f"cache stats: {err.code().name}")  # type: ignore[attr-defined]
        try:
            status = self._learner_client().status()
            snap.learner = {"version": status.version, "finished": status.finished, "loss": status.last_loss}
            snap.version = max(snap.version, int(status.version))
            finished = bool(status.finished) or status.version >= steps_total
        except grpc.RpcError as err:
            snap.notes.append(f"learner status: {err.code().name}")  # type: ignore[attr-defined]
        self.steps.poll()
        records = self.steps.records
        train = [r for r in records if r.is_step]
        if train:
            snap.last_step = train[-1]
            snap.version = max(snap.version, train[-1].version)
            tokens = sum(r.tokens or 0 for r in train)
            snap.train_tokens_per_s = train_rate.update(float(tokens))
        accs = [r.accuracy for r in records if r.accuracy is not None]
        snap.last_accuracy = accs[-1] if accs else self._accuracy_before
        rollout_total = 0.0
        seen = False
        for name, url in metrics_urls.items():
            if name.startswith("rollout-"):
                value = scrape_counter(url, "asyncopd_rollout_generated_tokens")
                if value is not None:
                    rollout_total += value
                    seen = True
        if seen:
            snap.rollout_tokens_per_s = rollout_rate.update(rollout_total)
        return snap, finished

    # -- the run -----------------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Like Ctrl-C: unwind from wherever the launcher is, so `execute` stops every child.
        # Only once, so a second SIGTERM cannot interrupt that clean-up.
        if not self._stop_requested:
            self._stop_requested = True
            raise RunStopped("stopped by SIGTERM before the run finished")

    def execute(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._execute()
        finally:
            if self._prometheus is not None:
                self._prometheus.stop()
            self.supervisor.stop_all(self.options.stop_grace_s)
            signal.signal(signal.SIGTERM, previous)
            self._forget_run_keys()

    def _forget_run_keys(self) -> None:
        """In a shared Redis, delete this run's keys (its own prefix), however the run ended."""
        if self.redis is None or self.redis.private:
            return
        try:
            delete_prefix(self.config.redis, self.redis.url, self.key_prefix)
        except redis.RedisError as exc:
            self.console.print(f"[yellow]could not delete this run's Redis keys ({self.key_prefix}:*): {exc}")

    def _execute(self) -> dict[str, Any]:
        config, opts, console = self.config, self.options, self.console
        accuracy_teacher: float | None = None
        if self.steps.path.exists():
            self.steps.path.unlink()  # a previous run's log in the same dir
        if opts.evaluate and not opts.skip_eval_before:
            t = time.monotonic()
            console.print(f"evaluating the student ({config.models.student}) before training ...")
            self._accuracy_before = evaluate_accuracy(config.models.student, config)
            if opts.evaluate_teacher:
                accuracy_teacher = evaluate_accuracy(config.models.teacher, config)
            console.print(
                f"accuracy before: student {self._accuracy_before:.3f}"
                + (f", teacher {accuracy_teacher:.3f}" if accuracy_teacher is not None else "")
                + f" ({time.monotonic() - t:.1f}s)"
            )
        if opts.private_redis:
            self.redis = start_private_redis(self.supervisor, config.redis, persistence_dir=opts.redis_persistence_dir)
        else:
            self.redis = ensure_redis(self.supervisor, config.redis)
        self._write_process_table()
        console.print(f"redis: {'private server ' if self.redis.private else ''}{self.redis.url}")
        ports = pick_ports(config)
        data = resolved_config_data(config, self.out_dir, self.redis.url, self.key_prefix, ports)
        config_path = self.out_dir / RESOLVED_CONFIG_NAME
        config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        config_from_dict(data, str(config_path))  # the children must be able to load it
        self._endpoints = dict(data["endpoints"])
        self.config_path, self.ports = config_path, ports

        launch_start = time.monotonic()
        metrics_urls = self.metrics_urls = self._start_services(config_path, ports)
        if opts.prometheus:
            self._prometheus = start_for_run(config.metrics, metrics_urls, self.out_dir)
            console.print(
                f"prometheus: {self._prometheus.url} (data kept in {self.out_dir / 'prometheus'})"
                if self._prometheus is not None
                else f"[yellow]{INSTALL_HINT}"
            )
        ready = time.monotonic()
        console.print(f"all services serving after {ready - launch_start:.1f}s; training {config.learner.steps} steps")

        wall_start = time.time()
        rollout_rate, train_rate = RateMeter(), RateMeter()
        snap: Snapshot | None = None
        next_line_s = 0.0  # without the live table: one progress line every 30 s
        live = Live(console=console, refresh_per_second=2) if opts.live else None
        with live if live is not None else contextlib.nullcontext():
            while True:
                self.supervisor.check()
                snap, finished = self._poll(ready, metrics_urls, rollout_rate, train_rate)
                ended_early = opts.on_tick is not None and opts.on_tick(self, snap) and not finished
                if live is not None:
                    live.update(progress_table(snap))
                elif snap.elapsed_s >= next_line_s:
                    console.print(f"step {snap.version}/{config.learner.steps} after {snap.elapsed_s:.0f}s")
                    next_line_s += 30.0
                if finished:
                    break
                if ended_early:
                    console.print(f"run ended at version {snap.version} by its on_tick hook")
                    self.supervisor.child("learner").stop(opts.stop_grace_s)
                    break
                if opts.max_wall_s is not None and time.monotonic() - ready > opts.max_wall_s:
                    raise TimeoutError(
                        f"the run did not finish within {opts.max_wall_s:.0f}s "
                        f"(version {snap.version}/{config.learner.steps}); logs in {self.supervisor.log_dir}"
                    )
                time.sleep(opts.poll_s)
        wall_seconds = time.monotonic() - ready
        if snap is not None and not opts.live:
            console.print(progress_table(snap))

        stage_seconds = self._stage_seconds(metrics_urls)
        final_stats = self._stop_producers_then_rest()
        self.steps.poll()
        if final_stats is None:
            raise RuntimeError("the cache's final accounting could not be read; the report would be incomplete")

        accuracy_after = self._accuracy_after()
        report = build_report(
            config,
            final_stats,
            self.steps.records,
            wall_seconds=wall_seconds,
            accuracy_before=self._accuracy_before,
            accuracy_after=accuracy_after,
            accuracy_teacher=accuracy_teacher,
            extra={
                "run_id": self.run_id,
                "startup_seconds": round(ready - launch_start, 3),
                "stage_seconds": stage_seconds,
                "redis": "private" if self.redis.private else "shared",
                "output_dir": str(self.out_dir),
            },
        )
        report_path = opts.report_path or self.out_dir / "report.json"
        if opts.plots:
            plots = self._write_plots(report, wall_start, report_path.parent)
            report["plots"] = [str(p) for p in plots]
        write_report(report, report_path)
        console.print(report_table(report))
        console.print(f"report: {report_path}")
        return report

    def _accuracy_after(self) -> float | None:
        if not self.options.evaluate:
            return None
        student = final_student_dir(self.out_dir / "checkpoints")
        if student is None:
            accs = [r.accuracy for r in self.steps.records if r.accuracy is not None]
            self.console.print("[yellow]no final student checkpoint found; using the learner's last evaluation")
            return accs[-1] if accs else None
        self.console.print(f"evaluating the trained student ({student}) ...")
        return evaluate_accuracy(str(student), self.config)

    def _write_plots(self, report: Mapping[str, Any], wall_start: float, where: Path) -> list[Path]:
        """The PNGs go next to the report."""
        points: list[tuple[int, float, float]] = []
        if report.get("accuracy_before") is not None:
            points.append((0, 0.0, float(report["accuracy_before"])))
        if report.get("accuracy_after") is not None:
            points.append((int(report["steps"]), float(report["wall_seconds"]), float(report["accuracy_after"])))
        hist = {int(k): int(v) for k, v in report["staleness_histogram"].items()}
        return write_plots(self.steps.records, where, hist, t0=wall_start, accuracy_points=points)


def run_pipeline(
    config: RunConfig, options: LaunchOptions | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run the pipeline locally and return the report (also written to disk)."""
    return LocalRun(config, options, console).execute()
