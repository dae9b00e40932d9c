"""Delta weight sync over a real gloo group on loopback (`weightsync.delta: true`).

After every delta update a replica's weights equal the learner's bf16 weights bit for bit; a
delta carries fewer bytes than the dense update; a late joiner gets the dense snapshot and then
deltas; and a replica whose kept copy does not hold the version a delta was encoded against
refuses it (no ack), registers again and is brought back with a dense update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.receive import BaseBuckets
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.wire.rpc import RunningServer, start_server

pytestmark = pytest.mark.service

CONFIG = WeightSyncConfig(timeout_s=10.0, bucket_mb=0.05, checksum=True, delta=True, heartbeat_s=0.2, dead_after_s=1.0)


class Learner:
    """fp32 master weights, published in bf16 after every step of small updates (an optimizer at a
    low learning rate moves few bf16 roundings per step)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.master = {
            "embed.weight": torch.randn(96, 64, generator=g) * 0.02,
            **{f"layers.{i}.w": torch.randn(64, 96, generator=g) * 0.02 for i in range(4)},
            "norm.weight": torch.ones(64),
            "frozen.bias": torch.randn(40, generator=g),
        }
        self.g = g

    def step(self) -> None:
        for name, w in self.master.items():
            if name != "frozen.bias":
                w.add_(torch.randn(w.shape, generator=self.g) * 3e-6)

    def bf16(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, w.to(torch.bfloat16)) for n, w in self.master.items()]


class Replica:
    """An in-process subscriber whose 'model' is a dict of the tensors it loaded (copied)."""

    def __init__(self, address: str, name: str) -> None:
        self.model: dict[str, torch.Tensor] = {}
        self.versions: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=run_subscriber, args=(address, name, self.apply, self.stop, CONFIG), kwargs={"retry_s": 0.2}
        )
        self.thread.start()

    def apply(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self.model[name] = tensor.clone()
        self.versions.append(version)

    def equals(self, weights: list[tuple[str, torch.Tensor]]) -> bool:
        return all(
            name in self.model and torch.equal(self.model[name].view(torch.int16), w.view(torch.int16))
            for name, w in weights
        )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=20)


@pytest.fixture
def learner() -> Iterator[tuple[CollectiveBroadcast, RunningServer]]:
    publisher = CollectiveBroadcast(CONFIG)
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    yield publisher, server
    publisher.close()
    server.stop(0)


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_deltas_are_exact_smaller_and_a_late_joiner_gets_the_dense_snapshot(
    learner: tuple[CollectiveBroadcast, RunningServer],
) -> None:
    publisher, server = learner
    model = Learner()
    a = Replica(server.address, "a")
    b: Replica | None = None
    try:
        wait_for(lambda: "a" in publisher.membership)
        report = publisher.publish(1, model.bf16())
        dense = report.nbytes
        wait_for(lambda: publisher.replicas == ["a"] and a.versions[-1:] == [1])
        assert a.equals(model.bf16())
        sent: dict[int, int] = {}
        for version in range(2, 7):
            model.step()
            before = publisher.sent_bytes
            publisher.publish(version, model.bf16())
            sent[version] = publisher.sent_bytes - before
            assert a.versions[-1] == version and a.equals(model.bf16()), version  # bit for bit, after every delta
            if version == 4:  # a late joiner: the dense snapshot, to it alone
                before = publisher.sent_bytes
                b = Replica(server.address, "b")
                wait_for(lambda b=b: b.versions[-1:] == [4] and len(publisher.replicas) == 2)  # type: ignore[misc]
                assert b.equals(model.bf16())
                assert publisher.sent_bytes - before == dense
        # deltas went to one replica for versions 2-4 and to both for 5-6, each far below dense
        assert all(0 < sent[v] < dense / 3 for v in (2, 3, 4)), (sent, dense)
        assert all(0 < sent[v] < 2 * dense / 3 for v in (5, 6)), (sent, dense)
        assert b is not None and b.versions == [4, 5, 6] and b.equals(model.bf16())
        assert a.versions == [1, 2, 3, 4, 5, 6]
    finally:
        a.close()
        if b is not None:
            b.close()


def test_a_delta_against_a_version_the_replica_lacks_is_refused_and_replaced_by_a_dense_update(
    learner: tuple[CollectiveBroadcast, RunningServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The learner's record says the replica acked version 2; the replica's kept copy does not
    hold it (its `finish` for version 2 is lost here). The version-3 delta is refused, never
    decoded or acked; the replica registers again and receives version 3 dense."""
    publisher, server = learner
    real = BaseBuckets.finish

    def lose_version_2(self: BaseBuckets, version: int) -> None:
        if version != 2:
            real(self, version)

    monkeypatch.setattr(BaseBuckets, "finish", lose_version_2)
    model = Learner()
    a = Replica(server.address, "a")
    try:
        wait_for(lambda: "a" in publisher.membership)
        dense = publisher.publish(1, model.bf16()).nbytes
        wait_for(lambda: a.versions[-1:] == [1])
        model.step()
        publisher.publish(2, model.bf16())
        assert a.versions[-1] == 2 and a.equals(model.bf16())
        model.step()
        caplog.set_level(logging.WARNING, logger="asyncopd.weightsync.subscriber")
        before = publisher.sent_bytes
        publisher.publish(3, model.bf16())
        wait_for(lambda: a.versions[-1:] == [3])
        assert a.versions == [1, 2, 3] and a.equals(model.bf16())
        refusals = [r.getMessage() for r in caplog.records if "against version 2" in r.getMessage()]
        assert refusals and "this replica holds -1" in refusals[0], caplog.text
        assert publisher.sent_bytes - before > dense  # the refused delta, then version 3 dense
        # back to deltas against the version it now holds
        model.step()
        before = publisher.sent_bytes
        publisher.publish(4, model.bf16())
        assert a.versions[-1] == 4 and a.equals(model.bf16())
        assert 0 < publisher.sent_bytes - before < dense / 3
    finally:
        a.close()
