"""`asyncopd.wire.work_loop`: claim → work → put, with outage waits, put back-off and give-back.

The cache is a scripted stand-in (each claim or put takes the next step: a result or an error
to raise) and the stop signal runs on a fake clock: `wait` records the delay, never sleeps, and
reports the signal set once the script says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from asyncopd.wire.cache_client import CacheFull
from asyncopd.wire.rpc import Outage
from asyncopd.wire.work_loop import (
    PUT_FIRST_DELAY_S,
    Claimed,
    Ended,
    put_with_backoff,
    run_work_loop,
)

pytestmark = pytest.mark.unit


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


UNAVAILABLE = _RpcError(grpc.StatusCode.UNAVAILABLE)
DENIED = _RpcError(grpc.StatusCode.PERMISSION_DENIED)


class FakeStop:
    """A stop signal on a fake clock; it sets itself at the `stop_at_wait`-th wait, if given."""

    def __init__(self, stop_at_wait: int | None = None) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self._set = False
        self._stop_at_wait = stop_at_wait

    def clock(self) -> float:
        return self.now

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "the loop never waits without a bound"
        self.waits.append(timeout)
        self.now += timeout
        if self._stop_at_wait is not None and len(self.waits) >= self._stop_at_wait:
            self._set = True
        return self._set


class Script:
    """Each call takes the next step: an exception is raised, a callable is called, else returned."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        if not self.steps:
            raise AssertionError(f"called past the script with {args}")
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step() if callable(step) else step


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Sequence[Any]] = []

    def __call__(self, items: Sequence[Any] = ()) -> None:
        self.calls.append(list(items))


def _done(items: Sequence[Any]) -> list[str]:
    return [f"done:{item}" for item in items]


def run(
    stop: FakeStop,
    claim: Script,
    put: Script,
    *,
    work: Callable[[Sequence[Any]], Any] | None = None,
    give_back: Recorder | None = None,
    settled: Recorder | None = None,
) -> tuple[Ended, Outage, Recorder, Recorder]:
    outage = Outage("r0: the cache", first_delay_s=0.05, max_delay_s=0.5, clock=stop.clock)
    work = _done if work is None else work
    give_back = Recorder() if give_back is None else give_back
    settled = Recorder() if settled is None else settled
    ended = run_work_loop(stop, outage, claim=claim, work=work, put=put, give_back=give_back, settled=settled)
    return ended, outage, give_back, settled


def test_delivers_each_claim_and_returns_when_the_cache_says_finished() -> None:
    stop = FakeStop()
    claim = Script(Claimed(["a", "b"]), Claimed([]), Claimed(["c"]), Claimed([], finished=True))
    put = Script(None, None)
    ended, _, give_back, settled = run(stop, claim, put)
    assert ended is Ended.FINISHED
    assert put.calls == [(["done:a", "done:b"],), (["done:c"],)]
    assert give_back.calls == [] and len(settled.calls) == 2
    assert stop.waits == [], "nothing failed, so nothing waited"


def test_finished_is_read_only_from_an_empty_claim() -> None:
    stop = FakeStop()
    claim = Script(Claimed(["a"], finished=True), Claimed([], finished=True))
    ended, *_ = run(stop, claim, Script(None))
    assert ended is Ended.FINISHED
    assert len(claim.calls) == 2, "the items claimed with finished=True are still delivered, then it claims again"


def test_a_claim_outage_waits_per_outage_then_recovers() -> None:
    stop = FakeStop()
    claim = Script(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, Claimed(["a"]), Claimed([], finished=True))
    ended, outage, _, _ = run(stop, claim, Script(None))
    assert ended is Ended.FINISHED
    assert stop.waits == pytest.approx([0.05, 0.1, 0.2])
    assert outage.failures == 3 and not outage.ongoing


def test_a_claim_error_that_is_not_retryable_propagates() -> None:
    stop = FakeStop()
    with pytest.raises(grpc.RpcError) as raised:
        run(stop, Script(DENIED), Script())
    assert raised.value is DENIED
    assert stop.waits == []


def test_stop_between_claims_ends_the_loop_without_work() -> None:
    stop = FakeStop()
    work = Script()  # any call fails: no work may run

    def stopped_meanwhile() -> Claimed[str]:
        stop.set()
        return Claimed([])

    claim = Script(Claimed([]), stopped_meanwhile)
    ended, *_ = run(stop, claim, Script(), work=work)
    assert ended is Ended.STOPPED
    assert work.calls == [] and len(claim.calls) == 2


def test_a_put_backs_off_while_the_cache_is_full_or_unreachable() -> None:
    stop = FakeStop()
    put = Script(CacheFull("full"), UNAVAILABLE, *[CacheFull("full")] * 6, None)
    claim = Script(Claimed(["a"]), Claimed([], finished=True))
    ended, _, give_back, settled = run(stop, claim, put)
    assert ended is Ended.FINISHED
    assert stop.waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert len(put.calls) == 9 and all(args == (["done:a"],) for args in put.calls), "the same result re-sent"
    assert give_back.calls == [] and len(settled.calls) == 1


def test_stop_while_putting_gives_the_claim_back_and_returns() -> None:
    stop = FakeStop(stop_at_wait=3)
    put = Script(*[CacheFull("full")] * 3)
    ended, _, give_back, settled = run(stop, Script(Claimed(["a", "b"])), put)
    assert ended is Ended.STOPPED
    assert give_back.calls == [["a", "b"]] and len(settled.calls) == 1
    assert stop.waits == pytest.approx([0.05, 0.1, 0.2])


def test_a_put_error_that_is_not_retryable_gives_the_claim_back_and_propagates() -> None:
    stop = FakeStop()
    give_back, settled = Recorder(), Recorder()
    with pytest.raises(grpc.RpcError) as raised:
        run(stop, Script(Claimed(["a"])), Script(DENIED), give_back=give_back, settled=settled)
    assert raised.value is DENIED
    assert give_back.calls == [["a"]] and len(settled.calls) == 1
    assert stop.waits == []


def test_work_that_fails_gives_the_claim_back_then_the_error_surfaces() -> None:
    stop = FakeStop()
    give_back, settled = Recorder(), Recorder()

    def broken(items: Sequence[str]) -> list[str]:
        raise RuntimeError("engine crashed")

    put = Script()
    with pytest.raises(RuntimeError, match="engine crashed"):
        run(stop, Script(Claimed(["a"])), put, work=broken, give_back=give_back, settled=settled)
    assert give_back.calls == [["a"]] and len(settled.calls) == 1
    assert put.calls == []


def test_work_interrupted_midway_gives_the_claim_back_and_returns() -> None:
    stop = FakeStop()

    def interrupted(items: Sequence[str]) -> list[str]:
        raise InterruptedError("stopped during generation")

    put = Script()
    ended, _, give_back, _ = run(stop, Script(Claimed(["a"])), put, work=interrupted)
    assert ended is Ended.STOPPED
    assert give_back.calls == [["a"]] and put.calls == []


def test_put_with_backoff_reports_whether_the_put_went_through() -> None:
    assert put_with_backoff(Script(CacheFull("full"), None), FakeStop()) is True
    stop = FakeStop(stop_at_wait=2)
    assert put_with_backoff(Script(CacheFull("full"), CacheFull("full")), stop) is False
    assert stop.waits == pytest.approx([PUT_FIRST_DELAY_S, 2 * PUT_FIRST_DELAY_S])
