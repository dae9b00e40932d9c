"""`bench fleet --idle-seconds`: an idle fleet (the admission window held, every client long-polling)
against the real cache service and Redis gets no work, and the cache's CPU over the idle window
is reported; `idle_cores` is CPU seconds over wall seconds."""

from __future__ import annotations

import argparse

import pytest
from asyncopd.lab.bench import fleet as bench
from asyncopd.lab.bench import fleet_idle

pytestmark = pytest.mark.service


def test_idle_cores_is_cpu_over_wall() -> None:
    assert fleet_idle.idle_cores(1.5, 30.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="wall_seconds"):
        fleet_idle.idle_cores(1.0, 0.0)


def test_an_idle_fleet_gets_no_work_and_its_cache_cpu_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    argv = ["--rollouts", "4", "--teachers", "2", "--batch-size", "4", "--max-staleness", "1"]
    args = parser.parse_args([*argv, "--idle-seconds", "2", "--idle-wait-ms", "200"])
    rep = fleet_idle.measure(args)
    assert rep["produced"] == 0 and rep["window_held"] == 8  # (eta + 1) * B held by the control client
    assert rep["cache_cpu_seconds"] >= 0 and rep["seconds"] >= 2.0
    # every idle client keeps asking: 4 replicas, 2 teachers, 1 learner, 200 ms waits
    assert set(rep["calls_per_s"]) == {"AcquirePrompts", "ClaimRollouts", "PullBatch"}
    assert rep["calls_per_s"]["AcquirePrompts"] > 4.0
    assert bench.run(args) == 0
    assert "cache CPU (service process)" in capsys.readouterr().out


def test_the_idle_fleet_waits_as_deployed_unless_told() -> None:
    from asyncopd.config import RunConfig

    c = RunConfig()
    assert fleet_idle.idle_waits(None) == {
        "AcquirePrompts": c.rollout.acquire_wait_ms,
        "ClaimRollouts": c.teacher.claim_wait_ms,
        "PullBatch": c.learner.pull_wait_ms,
    }
    assert set(fleet_idle.idle_waits(200).values()) == {200}
