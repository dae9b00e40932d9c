"""`bench fleet --direct`: the simulated actors write and read payload frames in Redis themselves and
the cache sees metadata only; the accounting stays exact and nothing is trained staler than the bound."""

from __future__ import annotations

import argparse

import pytest
from asyncopd.lab.bench import fleet as bench

pytestmark = pytest.mark.service


def test_a_direct_payload_fleet_trains_with_exact_accounting() -> None:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    for seconds in ("3", "6", "12", "24"):  # longer runs on a busy machine, until a few steps were taken
        argv = ["--rollouts", "4", "--teachers", "2", "--rollout-tps", "2000", "--learner-step-s", "0.05"]
        argv += ["--batch-size", "4", "--max-staleness", "1", "--mean-tokens", "64", "--max-tokens", "256"]
        args = parser.parse_args([*argv, "--teacher-topk", "64", "--direct", "--seconds", seconds])
        rep = bench.measure(args)
        assert rep["config"]["direct"] and rep["invariant_holds"], rep
        assert rep["max_staleness_trained"] <= 1, rep["staleness_histogram"]
        if rep["steps"] >= 3:
            break
    assert rep["steps"] >= 3 and rep["trained"] == 4 * rep["steps"], rep
