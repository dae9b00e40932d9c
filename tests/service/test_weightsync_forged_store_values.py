"""A live learner's store with a weight-sync key: values a client without the key writes —
a rebuild command, an assignment into a foreign group, a done key — are refused by the
replica and the learner (counted, never acted on); signed ones work (gloo on CPU,
replicas in threads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync import groups
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.subscriber import Subscriber
from asyncopd.wire.learner_client import LearnerClient
from asyncopd.wire.rpc import RunningServer, channel, start_server

pytestmark = pytest.mark.service

TIMEOUT_S = 5.0


def weights(step: int) -> list[tuple[str, torch.Tensor]]:
    return [("w", torch.full((16, 16), float(step))), ("b", torch.full((16,), float(step)))]


@pytest.fixture
def learner(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CollectiveBroadcast, RunningServer]]:
    monkeypatch.setenv(groups.KEY_ENV, "the-run-key")  # both sides read it, as the launcher and chart set it
    publisher = CollectiveBroadcast(WeightSyncConfig(timeout_s=TIMEOUT_S, heartbeat_s=0.2, dead_after_s=2.0))
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    yield publisher, server
    publisher.close()
    server.stop(0)


class Replica:
    def __init__(self, address: str, name: str) -> None:
        self.got: list[float] = []
        self.stop = threading.Event()
        self.chan = channel(address)

        def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
            tensors = dict(named)
            self.got.append(float(tensors["w"][0, 0]))
            assert version == int(self.got[-1])

        self.sub = Subscriber(LearnerClient(self.chan), name, apply, self.stop, heartbeat_s=0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sub.run()
            except Exception:
                self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.chan.close()


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_values_written_without_the_key_are_refused_signed_ones_work(
    learner: tuple[CollectiveBroadcast, RunningServer],
) -> None:
    publisher, server = learner
    membership = publisher.membership
    forger = groups.connect_store("127.0.0.1", publisher.store_port, 10.0)
    unkeyed = groups.Signer(None)  # knows the protocol, not the key
    a = Replica(server.address, "rollout-a")
    try:
        wait_for(lambda: publisher.replicas == ["rollout-a"])
        publisher.publish(1, weights(1))
        wait_for(lambda: a.got == [1.0])
        group = membership.group
        assert group is not None
        epoch, rebuilds = group.epoch, membership.rebuilds

        # A forged rebuild as the group's next command: acted on, the replica would leave the
        # group and the next publish would need a rebuild (a new epoch).
        unkeyed.put_json(forger, groups.command_key(epoch, group.seq + 1), {"op": "rebuild"})
        wait_for(lambda: a.sub.signer.refused >= 1)
        # A forged done key for the next update cannot end the learner's wait for the acks.
        unkeyed.put(forger, groups.done_key(epoch, group.seq + 1), "1")
        publisher.publish(2, weights(2))  # the learner's signed command replaces the forged one
        wait_for(lambda: a.got == [1.0, 2.0])
        assert (membership.group.epoch, membership.rebuilds) == (epoch, rebuilds)  # type: ignore[union-attr]
        assert a.sub.version == 2

        # The same command signed with the run's key (a key holder's write) is acted on: a
        # leaves the group and waits for its next assignment ...
        groups.Signer("the-run-key").put_json(forger, groups.command_key(epoch, group.seq + 1), {"op": "rebuild"})
        member = membership._members["rollout-a"]
        assign = groups.assign_key("rollout-a", member.registration, member.next_assignment)
        refused = a.sub.signer.refused
        # ... where a forged assignment into a foreign group is refused (read again and again:
        # the count grows) ...
        unkeyed.put_json(forger, assign, {"epoch": 999, "rank": 1, "world": 2, "backend": "gloo"})
        wait_for(lambda: a.sub.signer.refused >= refused + 3)
        # ... as is the right value signed with another key.
        groups.Signer("another-key").put_json(
            forger, assign, {"epoch": epoch + 1, "rank": 1, "world": 2, "backend": "gloo"}
        )
        refused = a.sub.signer.refused
        wait_for(lambda: a.sub.signer.refused >= refused + 3)
        assert not forger.check([groups.ready_key(999, 1)]) and not forger.check([groups.ready_key(epoch + 1, 1)])
        # The learner's broadcast misses a (timeout_s), it rebuilds: a's real assignment
        # replaces the forged one and a goes on, with the same registration.
        publisher.publish(3, weights(3))
        wait_for(lambda: a.got[-1] == 3.0)
        assert membership.group.epoch > epoch  # type: ignore[union-attr]
        assert membership._members["rollout-a"].registration == member.registration, "a never re-registered"
    finally:
        a.close()
