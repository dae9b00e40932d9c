"""Which weight-sync members are dead, from the heartbeat counters they bump in the store.

Every registered replica runs a heartbeat thread (its own store connection, so it beats even
while the replica's main thread sits in a broadcast) that adds 1 to its counter every
`weightsync.heartbeat_s`. The publisher reads the counters while it waits for members (to be
ready for a new group, or to ack an update): a member whose counter has not moved for
`weightsync.dead_after_s` of the publisher's own clock is dead — killed, frozen, or cut off —
and is dropped at once instead of after the full `timeout_s` (which must stay long enough for
a slow broadcast of a large model). A member announced with `expect` when it registers and that
never beats is dead `dead_after_s` after it registered (a registration that never beats would
otherwise hold every group rebuild for `timeout_s`); one neither expected nor read is not judged.

Clock-free across machines: only the publisher's monotonic clock is used. Pure bookkeeping
over a `read(member_key) -> int | None` function, so it is tested without a store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

# A member: (replica name, registration id).
MemberKey = tuple[str, int]


class Liveness:
    """Last heartbeat value of each member and when (publisher clock) it last changed."""

    def __init__(
        self,
        read: Callable[[MemberKey], int | None],
        dead_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.dead_after_s = dead_after_s
        self._clock = clock
        # member -> (last counter value read, None before the first beat; when it last changed)
        self._seen: dict[MemberKey, tuple[int | None, float]] = {}
        self._lock = threading.Lock()  # registrations (gRPC threads) and the publisher both look

    def expect(self, key: MemberKey) -> None:
        """`key` registered now: it is judged from now on, beating or not."""
        with self._lock:
            self._seen.setdefault(key, (None, self._clock()))

    def observe(self, key: MemberKey) -> None:
        value = self._read(key)
        if value is None:
            return
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is None or value != last[0]:
                self._seen[key] = (value, now)

    def dead(self, keys: Iterable[MemberKey]) -> list[MemberKey]:
        """The members among `keys` whose heartbeat stood still (or never began) for `dead_after_s`
        (reads them first)."""
        out = []
        now = self._clock()
        for key in keys:
            self.observe(key)
            with self._lock:
                last = self._seen.get(key)
            if last is not None and now - last[1] >= self.dead_after_s:
                out.append(key)
        return out

    def forget(self, key: MemberKey) -> None:
        with self._lock:
            self._seen.pop(key, None)
