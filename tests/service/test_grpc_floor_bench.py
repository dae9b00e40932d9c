"""`asyncopd bench grpc-floor` runs both server kinds in their own processes and reports each
one's CPU per RPC (the server's own, not the callers')."""

from __future__ import annotations

import json

import pytest
from asyncopd.cli import main

pytestmark = pytest.mark.service


def test_both_server_kinds_report_their_cpu_per_rpc(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "grpc-floor", "--calls", "400", "--callers", "4", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for kind in ("threads", "asyncio"):
        (us,) = result["us_per_rpc"][kind]
        # a server answering 400 checks spends CPU on each, and far less than a tenth of a second
        assert 1.0 < us < 100_000.0, (kind, us)
    assert result["ratio"] == pytest.approx(result["us_per_rpc"]["asyncio"][0] / result["us_per_rpc"]["threads"][0])
    assert "asyncio / thread pool" in out


def test_with_redis_calls_every_handler_of_both_kinds_makes_its_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "grpc-floor", "--calls", "400", "--callers", "4", "--repeats", "1", "--redis-calls", "2"]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["redis_calls"] == 2 and "each handler making 2 Redis round trips" in out
    for kind in ("threads", "asyncio"):
        # 100 checks to warm up, then 4 callers x 100, each check two script calls
        assert result["redis_round_trips"][kind] == [(1 + 4) * 100 * 2], kind
        (us,) = result["us_per_rpc"][kind]
        assert 1.0 < us < 100_000.0, (kind, us)


def test_a_negative_count_of_redis_calls_is_refused() -> None:
    with pytest.raises(SystemExit, match="--redis-calls -1: must be 0 or more"):
        main(["bench", "grpc-floor", "--redis-calls", "-1"])
