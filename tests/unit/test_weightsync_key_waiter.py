"""`groups.KeyWaiter`: a replica sleeps in the learner's real TCPStore until the next command key
is written (seen at once, no round trips on its own connection while it waits), still stops on
request, refuses a forged value and ends when the store goes away; the learner sleeps the same
way until an update's done key is written, and a wait it gives up is released."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.groups import KeyWaiter, Signer
from asyncopd.weightsync.membership import Member

NAME = groups.command_key(1, 1)


class Counting:
    """The caller's store connection, counting the requests made on it."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self.store, attr)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)

        return counted


@pytest.fixture
def master() -> dist.TCPStore:
    return groups.host_store("127.0.0.1", 0, 10.0)


def _client(master: dist.TCPStore) -> dist.TCPStore:
    return groups.connect_store("127.0.0.1", master.port, 10.0)


def _write_later(store: dist.Store, name: str, value: str, after_s: float) -> threading.Thread:
    def write() -> None:
        time.sleep(after_s)
        store.set(name, value)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_a_waiting_replica_makes_no_requests_until_the_command_is_written(master: dist.TCPStore) -> None:
    signer = Signer("k")
    caller = Counting(_client(master))
    writer = _write_later(master, NAME, signer.encode(NAME, '{"op": "update"}'), 0.5)
    payload = signer.poll(caller, NAME, threading.Event(), interval_s=0.005, waiter=KeyWaiter(_client(master)))  # type: ignore[arg-type]
    writer.join()
    assert payload == '{"op": "update"}'
    # One get once the key is there (the waiter saw it written: no check first); polling every
    # 5 ms for 0.5 s would be ~100.
    assert caller.calls == 1


def test_a_stop_ends_the_wait_without_the_key(master: dist.TCPStore) -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    assert Signer(None).poll(_client(master), NAME, stop, waiter=KeyWaiter(_client(master))) is None
    assert time.monotonic() - start < 2.0


def test_a_forged_command_is_refused_and_the_real_one_still_read(master: dist.TCPStore) -> None:
    signer = Signer("k")
    master.set(NAME, Signer("wrong").encode(NAME, '{"op": "forged"}'))  # wakes the waiter first
    writer = _write_later(master, NAME, signer.encode(NAME, '{"op": "update"}'), 0.3)
    payload = signer.poll(_client(master), NAME, threading.Event(), interval_s=0.01, waiter=KeyWaiter(_client(master)))
    writer.join()
    assert payload == '{"op": "update"}'
    assert signer.refused >= 1


def test_an_abandoned_wait_is_released_and_the_waiter_serves_the_next_key(master: dist.TCPStore) -> None:
    waiter = KeyWaiter(_client(master))
    given_up_at = time.monotonic() + 0.2
    assert not waiter.wait(NAME, threading.Event(), check_s=0.02, abandon=lambda: time.monotonic() > given_up_at)
    assert waiter.pending == NAME  # its thread still sleeps in the store
    with pytest.raises(RuntimeError, match="still blocked"):
        waiter.wait("other", threading.Event())
    assert waiter.release(master)
    assert waiter.pending is None
    writer = _write_later(master, "next", "1", 0.1)
    assert waiter.wait("next", threading.Event())
    writer.join()


def _learner(members: int) -> tuple[CollectiveBroadcast, Any]:
    transport = CollectiveBroadcast(WeightSyncConfig(timeout_s=5.0), signer=Signer("k"))
    group = type("G", (), {"epoch": 1, "members": [Member(f"r{i}", i, "cpu") for i in range(members)]})()
    return transport, group


def test_the_learner_sleeps_until_the_last_ack_writes_the_done_key() -> None:
    transport, group = _learner(2)
    try:
        transport.membership.dead = lambda members: []  # type: ignore[method-assign]  # both beat
        counting = Counting(transport._store)
        transport._store = counting  # type: ignore[assignment]
        replica = _client(counting.store)  # type: ignore[arg-type]

        def acks() -> None:
            time.sleep(0.5)
            for _ in range(2):
                replica.add(groups.ack_key(1, 7), 1)
            Signer("k").put(replica, groups.done_key(1, 7), "1")

        writer = threading.Thread(target=acks)
        writer.start()
        assert transport._acked(group, 7, 3)
        writer.join()
        # An ack count every 0.1 s, then the signature and the count; polling the done key with
        # a 0.2-2 ms back-off made ~250 requests in those 0.5 s.
        assert counting.calls <= 12
    finally:
        transport.close()


def test_a_member_that_stops_beating_ends_the_wait_and_frees_the_waiter() -> None:
    transport, group = _learner(1)
    try:
        transport.membership.dead = list  # type: ignore[method-assign]  # every member is silent
        assert not transport._acked(group, 8, 3)
        waiter = transport._waiter
        assert waiter is not None and waiter.pending is None  # released: the next update reuses it
        transport.membership.dead = lambda members: []  # type: ignore[method-assign]
        master = transport._store

        def ack() -> None:
            master.add(groups.ack_key(1, 9), 1)
            Signer("k").put(master, groups.done_key(1, 9), "1")

        threading.Timer(0.1, ack).start()
        assert transport._acked(group, 9, 4)
        assert transport._waiter is waiter
    finally:
        transport.close()


def test_the_wait_ends_with_an_error_when_the_store_goes_away() -> None:
    # The learner's store in a process of its own, killed while a replica waits on it.
    host = subprocess.Popen(
        [sys.executable, "-c", _HOST],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        port = int(host.stdout.readline())
        waiter = KeyWaiter(groups.connect_store("127.0.0.1", port, 10.0))
        threading.Timer(0.3, host.kill).start()
        start = time.monotonic()
        with pytest.raises((dist.DistError, RuntimeError)):
            waiter.wait(NAME, threading.Event())
        assert time.monotonic() - start < 5.0
    finally:
        host.kill()
        host.wait()


_HOST = """
import time
from asyncopd.weightsync import groups
store = groups.host_store("127.0.0.1", 0, 10.0)
print(store.port, flush=True)
time.sleep(60)
"""
