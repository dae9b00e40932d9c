"""`asyncopd bench cache-load` at smoke size: concurrent producers/teachers/learner against a real
cache service process; the run must report throughput and latencies and lose nothing."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest
from asyncopd.lab.bench import benchmarks
from asyncopd.lab.bench import cache_load as load

pytestmark = pytest.mark.service

SMALL = ["--producers", "4", "--teachers", "2", "--batch-size", "8", "--drain", "5", "--json"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """(the JSON result, everything printed) of a cache-load run that must pass its checks."""
    parser = argparse.ArgumentParser()
    load.add_args(parser)
    assert load.run(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_cache_load_smoke_loses_nothing_and_reports_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmarks()["cache-load"] == (load.add_args, load.run)
    result, out = _run([*SMALL, "--duration", "3"], capsys)
    assert result["invariant_holds"] and result["trained_twice"] == 0 and not result["errors"]
    assert result["steps"] >= 1 and result["trained"] == result["steps"] * 8
    assert result["ops_per_s"] > 0
    for rpc in ("AcquirePrompts", "PutRollouts", "ClaimRollouts", "PutScores", "PullBatch", "AckBatch"):
        stats = result["per_rpc"][rpc]
        assert stats["calls"] > 0 and 0 < stats["p50_ms"] <= stats["p99_ms"], (rpc, stats)
    assert "p99 ms" in out and "accounting:" in out


def test_cache_load_direct_payloads_lose_nothing_and_report_the_cache_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _run([*SMALL, "--duration", "3", "--direct", "--solo-cycles", "2"], capsys)
    assert result["path"] == "direct" and result["invariant_holds"] and result["trained_twice"] == 0
    assert result["steps"] >= 1 and result["trained"] == result["steps"] * 8 and not result["errors"]
    assert result["cache_cpu_s"] > 0 and result["ops_per_cache_cpu_s"] > 0
    # the gRPC floor of the same process: some CPU per empty RPC, less than a cache RPC costs
    assert 0 < result["grpc_floor_cpu_us"] < result["cache_cpu_us_per_rpc"]
    # one caller at a time, every kind of RPC costs the cache some CPU (less a reading's own cost)
    solo = result["solo_cpu_us"]
    kinds = ("AcquirePrompts", "PutRollouts", "ClaimRollouts", "PutScores", "PullBatch", "AckBatch", "PublishVersion")
    assert sorted(solo) == sorted(kinds) and all(solo[k] > 0 for k in kinds), solo
    assert "direct payloads" in out and "RPC per cache CPU second" in out and "gRPC floor" in out
    assert "cache CPU us, one caller" in out


def test_cache_load_over_two_load_processes_merges_their_records_and_loses_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Producers and teachers in two child processes (the learner here): their RPCs must reach the
    report (producers and teachers run only in the children), and nothing is lost or trained twice."""
    result, out = _run([*SMALL, "--duration", "4", "--direct", "--load-processes", "2"], capsys)
    assert result["load_processes"] == 2 and not result["errors"]
    assert result["invariant_holds"] and result["trained_twice"] == 0 and result["trained_matches"]
    assert result["steps"] >= 1 and result["trained"] == result["steps"] * 8
    for rpc in ("AcquirePrompts", "PutRollouts", "ClaimRollouts", "PutScores"):
        assert result["per_rpc"][rpc]["calls"] > 0, rpc
    # every sample trained was put by a child's producer and scored by a child's teacher
    assert result["per_rpc"]["PutRollouts"]["calls"] * 4 >= result["trained"]  # --chunk 4
    assert 0 < result["ops"] <= sum(r["calls"] for r in result["per_rpc"].values())
    assert "over 2 load processes" in out


def test_recorder_counts_the_rpcs_that_ended_by_a_deadline_across_merged_records() -> None:
    rec = load.Recorder()
    assert rec.timed("A", lambda x: x + 1, 1) == 2
    ((dt, end),) = rec.lat["A"]
    assert dt >= 0 and rec.ended_by(end) == 1 and rec.ended_by(end - 1e-6) == 0
    rec.merge({"A": [(0.5, end + 10.0)], "B": [(0.1, end - 5.0)]})
    assert [len(rec.lat[k]) for k in ("A", "B")] == [2, 1]
    assert rec.ended_by(end) == 2 and rec.ended_by(end + 10.0) == 3


def test_a_load_process_whose_workers_fail_fails_the_run_with_their_errors_and_does_not_hang(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Requests of 0 items are refused (INVALID_ARGUMENT) in the children's producers and
    teachers: the run must end early, say which worker failed and why, and return non-zero."""
    parser = argparse.ArgumentParser()
    load.add_args(parser)
    args = parser.parse_args([*SMALL, "--duration", "30", "--load-processes", "2", "--chunk", "0"])
    t0 = time.monotonic()
    assert load.run(args) == 1
    assert time.monotonic() - t0 < 25.0  # not the whole --duration: the failure stopped the load
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["errors"] and all("INVALID_ARGUMENT" in e or "max_prompts" in e for e in result["errors"])
    assert any(e.startswith(("producer-", "teacher-")) for e in result["errors"]), result["errors"]


def _driver_that_dies(args: argparse.Namespace, report: Connection) -> None:
    """A stand-in driver: starts one load process, starts its load, reports its pid, then waits
    to be killed (as a driver killed with SIGKILL would leave it)."""
    ctx = multiprocessing.get_context("spawn")
    stops, go = load._Stops(ctx.Event(), ctx.Event()), ctx.Event()
    mine, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=load._load_process,
        args=("127.0.0.1:1", args, stops, go, theirs),
        kwargs={"k": 0, "payload_prefix": None},
    )
    child.start()
    assert mine.recv() == "ready"
    go.set()
    report.send(child.pid)
    time.sleep(600)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


def test_a_load_process_whose_driver_is_killed_stops_on_its_own() -> None:
    parser = argparse.ArgumentParser()
    load.add_args(parser)
    args = parser.parse_args(["--producers", "0", "--teachers", "0", "--load-processes", "1"])
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=False)
    driver = ctx.Process(target=_driver_that_dies, args=(args, theirs))
    driver.start()
    assert mine.poll(120), "the stand-in driver never started its load process"
    pid = int(mine.recv())
    try:
        assert not _exited(pid)  # it runs while its driver lives
        driver.kill()
        driver.join(30)
        deadline = time.monotonic() + 20.0
        while not _exited(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _exited(pid), "the load process outlived its driver"
    finally:
        if driver.is_alive():
            driver.kill()
        if not _exited(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_load_process_that_is_gone_or_silent_reads_as_no_message() -> None:
    mine, theirs = multiprocessing.Pipe(duplex=False)
    assert load._receive(mine, 0.05) is None  # nothing said in time
    theirs.send("ready")
    assert load._receive(mine, 1.0) == "ready"
    theirs.close()  # the process died: end of file, not a crash of the driver
    assert load._receive(mine, 1.0) is None
