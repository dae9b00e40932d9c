"""`asyncopd.wire.rpc.Outage`: back-off toward a server that is down, and a log that stays short."""

from __future__ import annotations

import logging

import grpc
import pytest
from asyncopd.wire.rpc import Outage


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_waits_double_up_to_the_cap_and_start_again_after_recovery() -> None:
    outage = Outage("r0: the cache", first_delay_s=0.05, max_delay_s=0.5, clock=_Clock())
    waits = [outage.failed(_Unavailable()) for _ in range(6)]
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert outage.ongoing and outage.failures == 6
    outage.ok()
    assert not outage.ongoing
    assert outage.failed(_Unavailable()) == pytest.approx(0.05), "a new outage starts from the first delay"
    assert outage.failures == 7


def test_a_long_outage_is_a_few_log_lines_not_one_per_try(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    outage = Outage("r0: the cache", report_every_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="asyncopd.wire.rpc"):
        for _ in range(120):  # 30 s of tries, one every 0.25 s
            outage.failed(_Unavailable(), "acquire_prompts")
            clock.now += 0.25
        outage.ok()
        outage.ok()  # answering again and again logs nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "r0: the cache unreachable (UNAVAILABLE on acquire_prompts); retrying every <= 0.5s"
    assert lines[1:3] == [
        "r0: the cache still unreachable after 10s (UNAVAILABLE)",
        "r0: the cache still unreachable after 20s (UNAVAILABLE)",
    ]
    assert lines[3:] == ["r0: the cache reachable again after 30.0s"]
