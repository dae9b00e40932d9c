"""`asyncopd study --resume`: jobs an earlier study.json holds are taken as they are and only the
missing ones run; a saved study of other settings is refused (cell keys name only a row's
overrides, staleness and seed, so reusing them across settings would mix two studies)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from asyncopd.lab.study.cli import _check_resumable
from asyncopd.lab.study.plan import StudyPlan, StudySize
from asyncopd.lab.study.runner import Source, previous_jobs, run_study

pytestmark = pytest.mark.unit

SIZE = StudySize.quick()
PLAN = StudyPlan(k=8, size=SIZE, parts=(1, 2))
SOURCE = Source("configs/toy.yaml", ("learner.mini_batches=4", "learner.lr=5e-05"))


def saved_study() -> dict[str, Any]:
    """A study.json as `write_report` leaves it (the fields resume reads), every job done."""
    cells = [{"key": cell.key, "accuracy": 0.5} for cell in PLAN.cells()]
    return {
        "config": SOURCE.path,
        "overrides": list(SOURCE.overrides),
        "size": json.loads(json.dumps(dataclasses.asdict(SIZE))),
        "cells": cells,
        "probes": [],
        "baseline": {"student_accuracy": 0.4},
        "wide_baseline": None,
        "wide_source": None,
        "wall_seconds": 600.0,
    }


def test_a_finished_study_resumed_runs_nothing_and_keeps_every_record() -> None:
    saved = saved_study()
    previous = previous_jobs(saved)
    assert set(previous) == {"baseline", *(c.key for c in PLAN.cells())}
    run = run_study(SOURCE, PLAN, 1, previous=previous, previous_seconds=saved["wall_seconds"])
    assert run.cells == saved["cells"] and run.baseline == saved["baseline"]
    assert run.reused == len(previous) and run.wall_seconds >= 600.0


def test_a_study_of_other_settings_is_not_resumed() -> None:
    saved = saved_study()
    _check_resumable(saved, SOURCE, None, SIZE)  # the same study: accepted
    with pytest.raises(SystemExit, match=r"another size \(steps differ\)"):
        _check_resumable(saved, SOURCE, None, dataclasses.replace(SIZE, steps=SIZE.steps + 1))
    with pytest.raises(SystemExit, match=r"learner\.lr=5e-05"):
        _check_resumable(saved, Source(SOURCE.path, ("learner.mini_batches=4", "learner.lr=1e-4")), None, SIZE)
    wide = Source("configs/wide.yaml", ("learner.lr=1e-4",))
    with pytest.raises(SystemExit, match="wide world"):
        _check_resumable({**saved, "wide_source": {"path": wide.path, "overrides": []}}, SOURCE, wide, SIZE)
