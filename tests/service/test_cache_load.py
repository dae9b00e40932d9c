"""`asyncopd bench cache-load` at smoke size: concurrent producers/teachers/learner against a real
cache service process; the run must report throughput and latencies and lose nothing."""

from __future__ import annotations

import argparse
import json

import pytest
from asyncopd.lab.bench import benchmarks
from asyncopd.lab.bench import cache_load as load

pytestmark = pytest.mark.service


def test_cache_load_smoke_loses_nothing_and_reports_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmarks()["cache-load"] == (load.add_args, load.run)
    parser = argparse.ArgumentParser()
    load.add_args(parser)
    args = parser.parse_args(
        ["--producers", "4", "--teachers", "2", "--batch-size", "8", "--duration", "3", "--drain", "5", "--json"]
    )
    assert load.run(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["invariant_holds"] and result["trained_twice"] == 0 and not result["errors"]
    assert result["steps"] >= 1 and result["trained"] == result["steps"] * 8
    assert result["ops_per_s"] > 0
    for rpc in ("AcquirePrompts", "PutRollouts", "ClaimRollouts", "PutScores", "PullBatch", "AckBatch"):
        stats = result["per_rpc"][rpc]
        assert stats["calls"] > 0 and 0 < stats["p50_ms"] <= stats["p99_ms"], (rpc, stats)
    assert "p99 ms" in out and "accounting:" in out


def test_cache_load_direct_payloads_lose_nothing_and_report_the_cache_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    load.add_args(parser)
    argv = ["--producers", "4", "--teachers", "2", "--batch-size", "8", "--duration", "3", "--drain", "5"]
    args = parser.parse_args([*argv, "--direct", "--json"])
    assert load.run(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["path"] == "direct" and result["invariant_holds"] and result["trained_twice"] == 0
    assert result["steps"] >= 1 and result["trained"] == result["steps"] * 8 and not result["errors"]
    assert result["cache_cpu_s"] > 0 and result["ops_per_cache_cpu_s"] > 0
    # the gRPC floor of the same process: some CPU per empty RPC, less than a cache RPC costs
    assert 0 < result["grpc_floor_cpu_us"] < result["cache_cpu_us_per_rpc"]
    assert "direct payloads" in out and "RPC per cache CPU second" in out and "gRPC floor" in out
