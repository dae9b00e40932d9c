"""The pull loop a rollout or teacher replica runs against the cache: claim work, do it, put the
result, until told to stop.

`run_work_loop` rides through a cache it cannot reach: a claim that fails with a retryable gRPC
error waits as its `Outage` says, then tries again. A put the cache cannot take yet (full, or
unreachable) is re-sent with doubling back-off (`put_with_backoff`). Claimed work the loop will
not deliver (stopped while putting, or the work raised) goes to `give_back` before the loop
returns or the error surfaces. Errors that are not retryable propagate.

It knows the cache's back-pressure error and gRPC status codes; it knows nothing of engines,
scorers, metrics or what the work is.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from asyncopd.wire.cache_client import CacheFull
from asyncopd.wire.rpc import Outage, retryable

# A full cache drains as the learner consumes batches (seconds): back off from 50 ms to 2 s.
PUT_FIRST_DELAY_S = 0.05
PUT_MAX_DELAY_S = 2.0

T = TypeVar("T")
R = TypeVar("R")


class Stop(Protocol):
    """The loop's stop signal (`threading.Event` is one): a wait returns True once it is set."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class Claimed(Generic[T]):
    """What one claim returned: the work items, and whether the cache says the run is over."""

    items: Sequence[T]
    finished: bool = False  # read only when `items` is empty: no more work will come


class Ended(enum.Enum):
    """Why `run_work_loop` returned."""

    STOPPED = "stopped"  # `stop` was set (or the work said it was interrupted)
    FINISHED = "finished"  # the cache reported the run finished


def put_with_backoff(put: Callable[[], None], stop: Stop) -> bool:
    """Call `put` until it succeeds (True) or `stop` is set while waiting to retry (False).

    Retries while the cache is full (`CacheFull`) or unreachable (a retryable gRPC error);
    re-sending is safe because the cache counts what it already holds as a duplicate.
    """
    delay = PUT_FIRST_DELAY_S
    while True:
        try:
            put()
            return True
        except (CacheFull, grpc.RpcError) as err:
            if isinstance(err, grpc.RpcError) and not retryable(err):
                raise
            if stop.wait(delay):
                return False
            delay = min(delay * 2, PUT_MAX_DELAY_S)


def _nothing(*_: object) -> None:
    return None


def run_work_loop(
    stop: Stop,
    outage: Outage,
    *,
    claim: Callable[[], Claimed[T]],
    work: Callable[[Sequence[T]], R],
    put: Callable[[R], None],
    give_back: Callable[[Sequence[T]], None] = _nothing,
    settled: Callable[[], None] = _nothing,
) -> Ended:
    """Claim → work → put until `stop` is set or a claim reports the run finished.

    claim: one call to the cache (it may block up to its own wait); retryable gRPC errors are
        an outage (wait, retry), anything else propagates.
    work: turns the claimed items into what `put` sends; raising InterruptedError means it was
        stopped midway (the items are given back and the loop returns STOPPED).
    put: sends one result; retried by `put_with_backoff`.
    give_back: hands back claimed items the loop will not deliver (default: keep them; the
        cache re-delivers unacknowledged claims after their lease).
    settled: called once each non-empty claim is done with (delivered, given back or failed).
    """
    while not stop.is_set():
        try:
            claimed = claim()
        except grpc.RpcError as err:
            if not retryable(err):
                raise
            stop.wait(outage.failed(err))
            continue
        outage.ok()
        items = claimed.items
        if not items:
            if claimed.finished:
                return Ended.FINISHED
            continue
        try:
            try:
                result = work(items)
                delivered = put_with_backoff(functools.partial(put, result), stop)
            except InterruptedError:
                delivered = False
            except BaseException:
                give_back(items)  # work this replica will not deliver goes back, then the error surfaces
                raise
            if not delivered:
                give_back(items)
                return Ended.STOPPED
        finally:
            settled()
    return Ended.STOPPED
