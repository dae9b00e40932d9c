"""`asyncopd run` as a declared list of stages: they run in the declared order, and a stage that
fails (or a SIGTERM in the middle of one) ends the run with every process started so far
stopped by handle, newest first. Processes are stand-ins: nothing is spawned here."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncopd.config import config_from_dict
from asyncopd.lab.launch.processes import ChildDied
from asyncopd.lab.launch.redis_server import RedisEndpoint
from asyncopd.lab.launch.runner import LaunchOptions, LocalRun, RunStopped
from rich.console import Console

pytestmark = pytest.mark.unit

RUN_ORDER = [
    "run dir",
    "evaluate before",
    "redis",
    "child config",
    "cache",
    "learner",
    "teachers",
    "rollouts",
    "evaluator",
    "prometheus",
    "train",
    "drain",
    "evaluate after",
    "report",
]


class StandInChild:
    """What the launcher touches of a child process; records when it is stopped."""

    def __init__(self, name: str, argv: Sequence[str], stopped: list[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.pid = 100_000 + len(stopped)
        self.log_path = Path(f"/nonexistent/{name}.log")
        self.stopping = False
        self._stopped = stopped

    def alive(self) -> bool:
        return not self.stopping

    def stop(self, grace_s: float = 10.0) -> int:
        self.stopping = True
        self._stopped.append(self.name)
        return 0


def _run(tmp_path: Path) -> tuple[LocalRun, list[str]]:
    config = config_from_dict({"output_dir": str(tmp_path / "run"), "teacher": {"replicas": 2}})
    options = LaunchOptions(evaluate=False, live=False, plots=False)
    run = LocalRun(config, options, Console(file=io.StringIO()))
    stopped: list[str] = []

    def start(name: str, argv: Sequence[str], extra_env: Any = None, stdin_data: Any = None) -> StandInChild:
        child = StandInChild(name, argv, stopped)
        run.supervisor.children.append(child)  # type: ignore[arg-type]
        return child

    run.supervisor.start = start  # type: ignore[method-assign]
    return run, stopped


def _stand_in_redis(run: LocalRun) -> None:
    run.supervisor.start("redis", ["redis-server", "-"])
    run.redis = RedisEndpoint("redis://127.0.0.1:1/0", private=True)


def test_the_stages_are_declared_in_run_order(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    assert [stage.name for stage in run.stages()] == RUN_ORDER


def test_execute_runs_every_stage_in_the_declared_order_and_returns_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, stopped = _run(tmp_path)
    ran: list[str] = []
    for stage in run.stages():
        method = stage.run.__name__

        def record(name: str = stage.name) -> None:
            ran.append(name)
            if name == "report":
                run.found.report = {"steps": 1}

        monkeypatch.setattr(run, method, record)
    assert run.execute() == {"steps": 1}
    assert ran == RUN_ORDER
    assert list(run.stage_started) == RUN_ORDER
    assert stopped == []


def test_a_failing_stage_stops_the_started_processes_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, stopped = _run(tmp_path)
    monkeypatch.setattr(run, "_start_redis", lambda: _stand_in_redis(run))
    waited: list[str] = []

    def wait(name: str) -> None:
        waited.append(name)
        if name == "learner":
            raise ChildDied("learner", 1, Path("learner.log"), "bad config")

    monkeypatch.setattr(run.services, "wait", wait)
    previous = signal.getsignal(signal.SIGTERM)

    with pytest.raises(ChildDied, match="learner exited unexpectedly"):
        run.execute()

    assert waited == ["cache", "learner"]
    assert stopped == ["learner", "cache", "redis"], "every started process stopped, newest first"
    assert list(run.stage_started) == RUN_ORDER[: RUN_ORDER.index("learner") + 1], "nothing ran after the failure"
    assert signal.getsignal(signal.SIGTERM) == previous
    # The real stages ran up to the failure: the config the children read, their argv and table.
    config_path = run.out_dir / "config.yaml"
    assert config_path.is_file()
    assert run.supervisor.child("cache").argv[1:] == [
        "-m",
        "asyncopd.cli",
        "serve",
        "cache",
        "-c",
        str(config_path),
        "--name",
        "cache",
    ]
    table = json.loads((run.out_dir / "processes.json").read_text())
    assert [row["name"] for row in table] == ["redis", "cache", "learner"]


def test_a_sigterm_mid_stage_stops_the_started_processes_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, stopped = _run(tmp_path)
    monkeypatch.setattr(run, "_start_redis", lambda: _stand_in_redis(run))

    def wait(name: str) -> None:
        if name == "teacher-1":
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <launcher pid>` would, mid start-up

    monkeypatch.setattr(run.services, "wait", wait)
    previous = signal.getsignal(signal.SIGTERM)

    with pytest.raises(RunStopped):
        run.execute()

    assert stopped == ["teacher-1", "teacher-0", "learner", "cache", "redis"]
    assert run.ports is not None
    teacher = run.supervisor.child("teacher-1").argv
    assert teacher[teacher.index("--name") + 1 :] == [
        "teacher-1",
        "--set",
        f"teacher.server.port={run.ports.teachers[1]}",
        "--set",
        f"teacher.server.metrics_port={run.ports.metrics['teacher-1']}",
    ]
    assert "rollouts" not in run.stage_started
    assert signal.getsignal(signal.SIGTERM) == previous
