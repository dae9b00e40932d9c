"""Each local run in its own directory, a `latest` link beside them, nothing of an earlier run
deleted; `--resume` finds the run and its newest checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from asyncopd.config import config_from_dict, load_config
from asyncopd.lab.launch.rundir import (
    ResumeError,
    find_run,
    plan_run_dir,
    prepare_run_dir,
    resume_point,
)
from asyncopd.lab.launch.runner import LaunchOptions, LocalRun
from rich.console import Console

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


def test_the_default_output_dir_is_one_directory_per_run_under_the_name() -> None:
    assert load_config(None, environ=False).output_dir == "runs/{name}/{timestamp}"
    for config in ("configs/toy.yaml", "configs/toy-sync.yaml"):
        assert "{timestamp}" in load_config(config, environ=False).output_dir


def test_timestamped_runs_never_share_a_directory_and_latest_points_at_the_newest(tmp_path: Path) -> None:
    template = str(tmp_path / "runs/{name}/{timestamp}")
    first = plan_run_dir(template, "toy", NOW)
    assert first.parent == tmp_path / "runs/toy"
    prepare_run_dir(first, template)
    (first / "learner_steps.jsonl").write_text('{"version": 1}\n')
    second = plan_run_dir(template, "toy", NOW)  # the same second
    assert second != first and second.name == f"{first.name}-2"
    prepare_run_dir(second, template)
    latest = tmp_path / "runs/toy/latest"
    assert latest.is_symlink() and latest.resolve() == second
    assert (first / "learner_steps.jsonl").read_text() == '{"version": 1}\n', "the earlier run is untouched"
    assert find_run("auto", template, "toy") == second


def test_a_fixed_directory_holding_an_earlier_run_moves_it_aside(tmp_path: Path) -> None:
    fixed = tmp_path / "out"
    assert plan_run_dir(str(fixed), "toy", NOW) == fixed
    assert prepare_run_dir(fixed, str(fixed)) is None, "a new directory: nothing to move"
    (fixed / "learner_steps.jsonl").write_text("earlier\n")
    moved = prepare_run_dir(fixed, str(fixed))
    assert moved is not None and moved.name.startswith("out.previous-")
    assert (moved / "learner_steps.jsonl").read_text() == "earlier\n"
    assert fixed.is_dir() and not any(fixed.iterdir())
    assert find_run("auto", str(fixed), "toy") == fixed


def _checkpoint(run_dir: Path, version: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{version:08d}"
    path.mkdir(parents=True)
    (path / "learner.json").write_text(json.dumps({"version": version}))
    return path


def test_resume_point_is_the_newest_checkpoint_and_a_run_without_one_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ResumeError, match="no learner checkpoint"):
        resume_point(run)
    _checkpoint(run, 3)
    newest = _checkpoint(run, 7)
    point = resume_point(run)
    assert (point.checkpoint, point.version) == (newest, 7)
    (run / "checkpoints/LATEST").write_text("step-00000003")  # LATEST wins when it names one
    assert resume_point(run).version == 3
    with pytest.raises(ResumeError, match="no such run directory"):
        find_run(str(tmp_path / "missing"), "runs/{name}/{timestamp}", "toy")
    with pytest.raises(ResumeError, match=r"no .*latest"):
        find_run("auto", str(tmp_path / "runs/{name}/{timestamp}"), "toy")


def test_a_new_run_keeps_its_config_for_resume_and_a_resumed_run_goes_back_into_its_directory(
    tmp_path: Path,
) -> None:
    config = config_from_dict({"output_dir": str(tmp_path / "runs/{name}/{timestamp}"), "redis": {"password": "s3"}})
    run = LocalRun(config, LaunchOptions(evaluate=False, live=False, plots=False), Console(file=io.StringIO()))
    assert run.out_dir.parent == tmp_path / "runs/toy"
    run._prepare_run_dir()
    saved = run.out_dir / "run-config.yaml"
    data = yaml.safe_load(saved.read_text())
    assert data["redis"]["password"] is None, "the password never goes into a file"
    assert load_config([str(saved)], environ=False).output_dir == config.output_dir
    assert not run.config.learner.resume

    _checkpoint(run.out_dir, 4)
    (run.out_dir / "learner_steps.jsonl").write_text('{"event": "step", "version": 4, "loss": 1.0}\n')
    point = resume_point(find_run("auto", config.output_dir, "toy"))
    resumed = LocalRun(
        config, LaunchOptions(evaluate=True, live=False, plots=False, resume=point), Console(file=io.StringIO())
    )
    assert resumed.out_dir == run.out_dir
    assert resumed.config.learner.resume, "the learner starts from the checkpoint"
    resumed._prepare_run_dir()
    resumed._evaluate_before()  # skipped: the student has trained already
    assert resumed.found.accuracy_before is None
    assert resumed.found.records_before == 1
    assert (run.out_dir / "learner_steps.jsonl").read_text().count("\n") == 1, "the step log is kept"
