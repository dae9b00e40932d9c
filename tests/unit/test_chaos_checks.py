"""The chaos checks on hand-written records: each must catch the fault it exists for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from asyncopd.lab.chaos.checks import (
    WIPED,
    accuracy_in_line,
    check_step_log,
    combined_accounting,
    longest_gap,
    prompt_position,
    regressions,
    skipped_positions,
)
from asyncopd.lab.chaos.faults import KINDS, OPT_IN, FaultSpec, default_schedule, parse_fault, parse_schedule
from asyncopd.lab.chaos.injector import Injector
from asyncopd.lab.launch.progress import Snapshot


def step(version: int, *ids: str) -> dict[str, object]:
    return {"event": "step", "version": version, "sample_ids": list(ids)}


def start(version: int, checkpoint: int | None) -> dict[str, object]:
    return {"event": "start", "version": version, "checkpoint_version": checkpoint}


# -- accounting over Redis epochs ----------------------------------------------------------


def test_accounting_sums_epochs_and_counts_what_a_wipe_held_as_dropped() -> None:
    before_wipe = {"produced": 10, "trained": 6, "dropped": {"stale": 1}, "in_flight": 3, "staleness_served": {"0": 6}}
    final = {"produced": 8, "trained": 5, "dropped": {"lost": 2}, "in_flight": 1, "staleness_served": {"0": 2, "1": 3}}
    acc = combined_accounting([before_wipe], final)
    assert (acc["produced"], acc["trained"], acc["in_flight"]) == (18, 11, 1)
    assert acc["dropped"] == {"lost": 2, WIPED: 3, "stale": 1}
    assert acc["unaccounted"] == 0 and acc["redis_epochs"] == 2
    assert acc["staleness_served"] == {"0": 8, "1": 3}


def test_accounting_reports_a_silently_missing_sample() -> None:
    final = {"produced": 10, "trained": 6, "dropped": {"stale": 1}, "in_flight": 2}
    assert combined_accounting([], final)["unaccounted"] == 1


# -- the step log --------------------------------------------------------------------------


def test_clean_log_passes() -> None:
    verdict = check_step_log([start(0, None), step(1, "a", "b"), {"event": "eval", "version": 1}, step(2, "c")])
    assert verdict.problems() == []
    assert (verdict.steps, verdict.surviving_steps, verdict.samples_surviving) == (2, 2, 3)


def test_a_sample_trained_twice_is_caught() -> None:
    verdict = check_step_log([start(0, None), step(1, "a", "b"), step(2, "b")])
    assert verdict.trained_twice == ["b"]
    assert any("trained twice" in p for p in verdict.problems())


def test_resume_voids_the_steps_after_its_checkpoint() -> None:
    # Steps 3 and 4 died with the learner (checkpoint 2); retraining "c" afterwards is not a duplicate.
    records = [start(0, None), step(1, "a"), step(2, "b"), step(3, "c"), step(4, "d"), start(4, 2), step(5, "c")]
    verdict = check_step_log(records)
    assert verdict.problems() == []
    assert (verdict.void_steps, verdict.samples_void, verdict.starts) == (2, 2, 2)


def test_a_duplicate_within_the_surviving_lineage_is_still_caught_after_a_resume() -> None:
    records = [start(0, None), step(1, "a"), step(2, "b"), start(2, 2), step(3, "a")]
    assert check_step_log(records).trained_twice == ["a"]


def test_restart_without_checkpoint_voids_everything_before() -> None:
    verdict = check_step_log([start(0, None), step(1, "a"), start(1, None), step(2, "a")])
    assert verdict.problems() == [] and verdict.void_steps == 1


def test_versions_going_backwards_are_caught() -> None:
    assert check_step_log([step(3, "a"), step(3, "b")]).version_regressions
    assert check_step_log([step(5, "a"), start(4, 4), step(6, "b")]).version_regressions
    assert check_step_log([step(1, "a"), step(2, "b")]).version_regressions == []


def test_missing_sample_ids_are_a_problem_not_a_pass() -> None:
    verdict = check_step_log([{"event": "step", "version": 1}])
    assert verdict.missing_sample_ids == 1 and verdict.problems()


def test_polled_versions_and_accuracy() -> None:
    assert regressions([(0.0, 1), (1.0, 3), (2.0, 3)]) == []
    assert regressions([(0.0, 4), (1.0, 2)]) == ["polled version fell from 4 to 2 at 1.0s"]
    assert accuracy_in_line(0.70, 0.75, 0.1)[0] is True
    assert accuracy_in_line(0.60, 0.75, 0.1)[0] is False
    assert accuracy_in_line(None, 0.75, 0.1)[0] is None


# -- the schedule --------------------------------------------------------------------------


def test_parse_faults() -> None:
    assert parse_fault("kill-rollout@8:rollout-1") == FaultSpec("kill-rollout", 8, "rollout-1")
    assert [f.at_version for f in parse_schedule("kill-cache@20, kill-teacher@10")] == [10, 20]
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_fault("kill-everything@3")
    with pytest.raises(ValueError, match="kind@version"):
        parse_fault("kill-cache")
    with pytest.raises(ValueError, match="rollout-N"):
        parse_fault("kill-rollout@3:teacher-0")
    with pytest.raises(ValueError, match=">= 1"):
        parse_fault("kill-cache@0")


def test_default_schedule_covers_every_kind_in_order_within_the_run() -> None:
    schedule = default_schedule(120)
    assert {f.kind for f in schedule} == set(KINDS) - set(OPT_IN)
    versions = [f.at_version for f in schedule]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert versions[0] >= 1 and versions[-1] < 120
    with pytest.raises(ValueError, match="at least"):
        default_schedule(10)


def test_longest_gap_measures_the_stall_inside_a_faults_window() -> None:
    times = [0.0, 0.5, 1.0, 7.0, 7.5, 8.0, 20.0]
    assert longest_gap(times, start=1.2, end=9.0) == pytest.approx(5.8)  # from the fault to the next step
    assert longest_gap(times, start=7.2, end=7.9) == pytest.approx(0.4)
    # the 12 s stall after 8.0 belongs to a later fault: only its part inside this window counts
    assert longest_gap(times, start=7.2, end=9.0) == pytest.approx(1.0)
    assert longest_gap(times, start=30.0, end=31.0) is None


# -- when the injector lets the run end ------------------------------------------------------


class _Run:
    """The one launcher call a start-rollout fault makes (`add_replica`); nothing else is touched."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_replica(self, role: str) -> SimpleNamespace:
        self.added.append(role)
        return SimpleNamespace(name=f"{role}-{len(self.added) + 1}", pid=1000 + len(self.added))


def tick(injector: Injector, run: _Run, version: int, steps_total: int = 300) -> bool:
    snap = Snapshot(elapsed_s=0.0, steps_total=steps_total, version=version, learner={"version": version})
    return injector(run, snap)  # type: ignore[arg-type]


def test_the_run_goes_on_past_the_steps_asked_for_until_the_schedule_is_survived() -> None:
    run = _Run()
    injector = Injector([FaultSpec("start-rollout", 20)], finish_at=100, tail_steps=10)
    assert not tick(injector, run, 5)
    # the fault's version slipped past the steps asked for: it still fires, and the run waits for it
    assert not tick(injector, run, 150)
    assert run.added == ["rollout"] and injector.outcomes[0].fired_version == 150
    assert not tick(injector, run, 151)  # settled: back at 151, not yet survived
    assert not tick(injector, run, 152)  # progress after recovery: survived, tail not yet trained
    assert injector.outcomes[0].survived
    assert not tick(injector, run, 160)
    assert tick(injector, run, 161), "survived, 10 steps past the recovery at 151 and past 100"


def test_the_run_does_not_end_before_the_steps_asked_for() -> None:
    run = _Run()
    injector = Injector([FaultSpec("start-rollout", 2)], finish_at=100, tail_steps=1)
    for version in (2, 3, 4, 50, 99):
        assert not tick(injector, run, version)
    assert tick(injector, run, 100)


def test_a_fault_that_could_not_be_injected_does_not_hold_the_run_forever() -> None:
    run = _Run()
    injector = Injector([FaultSpec("kill-rollout", 2, "rollout-0")], finish_at=10, tail_steps=5)
    assert not tick(injector, run, 2)  # fires; the stand-in run has no rollout-0 to kill
    assert injector.outcomes[0].error is not None
    assert not tick(injector, run, 9)
    assert tick(injector, run, 10)


def test_reaching_the_step_budget_ends_the_run_and_never_fired_faults_stay_pending() -> None:
    run = _Run()
    injector = Injector([FaultSpec("start-rollout", 400)], finish_at=100)
    assert tick(injector, run, 300, steps_total=300)
    assert injector.outcomes == [] and not injector.done(300)


# -- prompt positions ----------------------------------------------------------------------


def test_a_position_replayed_under_another_run_id_is_trained_twice() -> None:
    """A Redis wipe that restarted the cursor at 0: new sample ids, the same prompts again."""
    assert prompt_position("0a1b2c-17:ffee00112233") == ("", 17) and prompt_position("p/3:ab") is None
    assert prompt_position("s1.0a1b2c-4:ff") == ("s1", 4)
    verdict = check_step_log([step(1, "aaa-0:x1", "aaa-1:x2"), step(2, "bbb-0:y1", "bbb-2:y2")])
    assert verdict.trained_twice == [] and verdict.positions_trained_twice == [0]
    assert verdict.position_twice_detail == ["0: aaa-0:x1 @ v1, bbb-0:y1 @ v2"]
    assert any("prompt position" in p and "bbb-0:y1 @ v2" in p for p in verdict.problems())


def test_positions_of_voided_steps_may_be_trained_again() -> None:
    log = [step(1, "aaa-0:x1"), step(2, "aaa-1:x2"), start(1, 1), step(2, "aaa-1:x3")]
    verdict = check_step_log(log)
    assert verdict.positions_trained_twice == [] and verdict.positions_trained == 2


def test_holes_beyond_drops_are_skipped_positions() -> None:
    verdict = check_step_log([step(1, "aaa-0:a", "aaa-1:b"), step(2, "aaa-5:c", "s1.bbb-0:d", "s1.bbb-1:e")])
    assert verdict.position_holes == 3 and verdict.positions_trained_twice == []
    assert skipped_positions(verdict, {"dropped_total": 3, "in_flight": 0}) == 0
    assert skipped_positions(verdict, {"dropped_total": 1, "in_flight": 1}) == 1
