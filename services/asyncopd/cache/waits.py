"""The waiting requests of one cache process: each holds a gRPC worker thread while it waits.

AcquirePrompts, ClaimRollouts and PullBatch may wait at the cache (long polls, seconds: an idle
fleet then costs one call per client per wait). The gRPC server runs each request on one of its
`cache.server.workers` threads, so a waiting request holds a thread for its whole wait. `Waits`
keeps the two consequences in hand:

- **No starvation.** At most `limit` requests wait at once (the workers less a reserve,
  `waiting_limit`); one more is answered at once with what there is (its wait is cut, counted
  and logged), so puts, acks and the learner's pulls always find a free thread. A fleet larger
  than the limit shows as cut waits: raise `cache.server.workers` (or run more cache replicas).
- **No orphaned waits.** A request whose caller goes away (cancelled, deadline passed,
  connection dropped: `CacheClient.stop_waiting` when a service stops) has its `gone` event
  set and the store's waiters woken: its wait ends at once and takes nothing, which would be
  handed to nobody.

It knows gRPC's server context and counts; the waiting itself is the store's (`wait_any`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

log = logging.getLogger(__name__)


def waiting_limit(workers: int) -> int:
    """How many of `workers` threads may hold a waiting request: all but a reserve of an eighth
    (at least 2, at most 32) for the requests that do not wait."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, workers - max(2, min(32, workers // 8)))


def workers_for(waiting: int) -> int:
    """The fewest workers whose `waiting_limit` lets `waiting` requests wait at once."""
    if waiting < 1:
        raise ValueError(f"waiting must be >= 1, got {waiting}")
    workers = waiting  # never fewer: the limit is at most the workers
    while waiting_limit(workers) < waiting:
        workers += 1
    return workers


class Waits:
    """Admits waiting requests up to `limit` at once; see the module docstring.

    `wake()` rouses the store's waiters (they look at their `gone` events); `on_count(n)` is
    told the number waiting after each change, `on_cut()` of each wait cut for want of threads.
    """

    def __init__(
        self,
        limit: int,
        wake: Callable[[], None],
        on_count: Callable[[int], None] = lambda n: None,
        on_cut: Callable[[], None] = lambda: None,
        warn_every_s: float = 60.0,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._wake = wake
        self._on_count = on_count
        self._on_cut = on_cut
        self._warn_every_s = warn_every_s
        self._lock = threading.Lock()
        self.waiting = 0  # requests waiting now
        self.cut = 0  # waits cut for want of threads, since start
        self._warned = -float("inf")

    @contextmanager
    def slot(self, context: grpc.ServicerContext, wait_ms: int) -> Iterator[tuple[int, threading.Event]]:
        """(the wait this request may take, in ms; its `gone` event) for the duration of the
        request: `wait_ms`, or 0 when `limit` requests wait already."""
        held = warn = False
        if wait_ms > 0:
            with self._lock:
                if self.waiting < self.limit:
                    self.waiting += 1
                    held = True
                    self._on_count(self.waiting)
                else:
                    self.cut += 1
                    now = time.monotonic()
                    warn = now - self._warned >= self._warn_every_s
                    if warn:
                        self._warned = now
                    self._on_cut()
            if not held:
                wait_ms = 0
            if warn:
                log.warning(
                    "%d requests wait at this cache, as many as its gRPC workers allow beside a reserve for puts "
                    "and acks: further waits are answered at once (%d cut so far); raise cache.server.workers "
                    "above the rollout replicas + teachers + learner ranks this cache serves, or run more cache "
                    "replicas",
                    self.limit,
                    self.cut,
                )
        gone = threading.Event()
        running = [True]

        def ended() -> None:
            if running[0]:
                gone.set()
                self._wake()

        if wait_ms > 0 and not context.add_callback(ended):  # the RPC is over already
            gone.set()
        try:
            yield wait_ms, gone
        finally:
            running[0] = False
            if held:
                with self._lock:
                    self.waiting -= 1
                    self._on_count(self.waiting)
