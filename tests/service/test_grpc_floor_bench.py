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
