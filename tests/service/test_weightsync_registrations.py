"""Weight-sync registrations and announcements against hostile or broken replicas, on a real
mutual-TLS learner server (loopback; certificates made by openssl here) with real subscribers:

- a registration is bound to its caller (certificate identities + host): another rollout pod
  cannot take a live replica's name (FAILED_PRECONDITION; the live one keeps receiving) nor
  unregister it (PERMISSION_DENIED); the same caller re-registering replaces its own, and the
  replaced registration is told `dropped` instead of waiting forever;
- `collective=false` must name the caller's own host as its push address (PERMISSION_DENIED);
- at most `weightsync.max_replicas` registrations (RESOURCE_EXHAUSTED);
- a registration that never beats is dropped after `dead_after_s`, so it stalls a publish for
  that long, not for `timeout_s`, and its name is free again;
- a store write announcing a 1 PB bucket is refused by the subscriber before anything is
  allocated, and the subscriber goes on receiving the learner's real updates.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync import groups
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.manifest import ParamSpec
from asyncopd.weightsync.receive import ReceiveBuffers
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.wire.learner_client import LearnerClient
from asyncopd.wire.rpc import RunningServer, channel, start_server
from required_tools import require_tool
from test_tls import make_ca, make_cert
from waiting import returns_within

pytestmark = pytest.mark.service

TIMEOUT_S = 30.0  # long, as for a big model: a stall of this order would show
DEAD_AFTER_S = 1.0
# Two rollout pods: the same role (what authorisation checks), different certificates.
PODS = {
    "pod-a": "URI:spiffe://asyncopd/rollout,DNS:rollout-a.pods",
    "pod-b": "URI:spiffe://asyncopd/rollout,DNS:rollout-b.pods",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    for pod, san in PODS.items():
        make_cert(d, "ca", pod, san)
    return d


def tls(d: Path, who: str) -> TLSConfig:
    crt, key, ca = (str(d / f) for f in (f"{who}.crt", f"{who}.key", "ca.crt"))
    return TLSConfig(enabled=True, cert_file=crt, key_file=key, ca_file=ca)


def weights(step: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [("embed.weight", torch.randn(64, 32, generator=g)), ("norm.weight", torch.randn(32, generator=g))]


MODEL = {name: ParamSpec.of(t) for name, t in weights(0)}


@dataclass
class Learner:
    pki: Path
    publisher: CollectiveBroadcast
    server: RunningServer
    config: WeightSyncConfig

    def client(self, pod: str) -> LearnerClient:
        return LearnerClient(channel(self.server.address, tls=tls(self.pki, pod)))

    def store(self) -> object:
        return groups.connect_store("127.0.0.1", self.publisher.store_port, 10.0)


@pytest.fixture
def learner(pki: Path) -> Iterator[Learner]:
    config = WeightSyncConfig(timeout_s=TIMEOUT_S, heartbeat_s=0.2, dead_after_s=DEAD_AFTER_S, max_replicas=3)
    publisher = CollectiveBroadcast(config)
    server = start_server(
        ServerConfig(port=0),
        [add_to_server(LearnerServicer(publisher, Progress))],
        [SERVICE_NAME],
        tls(pki, "server"),
    )
    try:
        yield Learner(pki, publisher, server, config)
    finally:
        publisher.close()
        server.stop(0)


@dataclass
class Replica:
    got: list[int]
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def subscribe(learner: Learner, pod: str, name: str) -> Replica:
    got: list[int] = []

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        got.append(version)

    stop = threading.Event()
    thread = threading.Thread(
        target=run_subscriber,
        args=(learner.server.address, name, apply, stop, learner.config, tls(learner.pki, pod)),
        kwargs={"expected": MODEL, "retry_s": 0.2},
        daemon=True,
    )
    thread.start()
    return Replica(got, stop, thread)


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def refused(call: object, code: grpc.StatusCode, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for needle in needles:
        assert needle in (info.value.details() or ""), (needle, info.value.details())


def test_a_live_name_is_neither_taken_nor_unregistered_by_another_pod(learner: Learner) -> None:
    a = subscribe(learner, "pod-a", "rollout-0")
    try:
        wait_for(lambda: learner.publisher.replicas == ["rollout-0"])
        learner.publisher.publish(1, weights(1))
        wait_for(lambda: a.got == [1])
        other = learner.client("pod-b")
        refused(lambda: other.register("rollout-0"), grpc.StatusCode.FAILED_PRECONDITION, "rollout-0", "live")
        refused(
            lambda: other.register("rollout-0", "127.0.0.1:1", collective=False), grpc.StatusCode.FAILED_PRECONDITION
        )
        refused(lambda: other.unregister("rollout-0"), grpc.StatusCode.PERMISSION_DENIED, "another caller")
        # Nothing was evicted: the live replica stays in the group and keeps receiving.
        time.sleep(3 * DEAD_AFTER_S)
        assert learner.publisher.replicas == ["rollout-0"]
        learner.publisher.publish(2, weights(2))
        wait_for(lambda: a.got == [1, 2])
    finally:
        a.close()
    # Its own stop unregisters it (its owner may).
    wait_for(lambda: learner.publisher.replicas == [] and "rollout-0" not in learner.publisher.membership)


def assignments(store: object, replica: str, registration: int) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for k in range(8):
        key = groups.assign_key(replica, registration, k)
        if not store.check([key]):  # type: ignore[attr-defined]
            break
        out.append(json.loads(json.loads(store.get(key))["v"]))  # type: ignore[attr-defined]  # signed envelope
    return out


class Beat:
    """A registration's heartbeat, as a subscriber's heartbeat thread bumps it."""

    def __init__(self, learner: Learner, replica: str, registration: int) -> None:
        self.done = threading.Event()
        store = learner.store()
        key = groups.heartbeat_key(replica, registration)

        def beat() -> None:
            while not self.done.is_set():
                store.add(key, 1)  # type: ignore[attr-defined]
                self.done.wait(0.1)

        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def test_the_same_caller_replaces_its_registration_and_the_old_one_is_told(learner: Learner) -> None:
    client = learner.client("pod-a")
    first = client.register("solo")
    beats = [Beat(learner, "solo", first.registration)]
    try:
        second = client.register("solo")  # a restart of the same pod: replaces its own live one
        beats.append(Beat(learner, "solo", second.registration))
        assert second.registration > first.registration
        store = learner.store()
        # The replaced registration is told, instead of waiting for an assignment forever.
        wait_for(
            lambda: any("replaced" in str(a.get("reason")) for a in assignments(store, "solo", first.registration))
        )
        # A stale registration id unregisters nothing; the current one does.
        client.unregister("solo", first.registration)
        assert "solo" in learner.publisher.membership
        client.unregister("solo", second.registration)
        assert "solo" not in learner.publisher.membership
    finally:
        for beat in beats:
            beat.stop()


def test_a_registration_that_never_beats_stalls_a_publish_for_dead_after_not_timeout(learner: Learner) -> None:
    a = subscribe(learner, "pod-a", "rollout-0")
    try:
        wait_for(lambda: learner.publisher.replicas == ["rollout-0"])
        ghost = learner.client("pod-b").register("ghost")  # registers, never beats, never gets ready
        started = time.monotonic()
        returns_within(TIMEOUT_S / 2, lambda: learner.publisher.publish(1, weights(1)), "waited for the silent one")
        assert time.monotonic() - started < TIMEOUT_S / 2
        assert learner.publisher.replicas == ["rollout-0"]
        assert "ghost" not in learner.publisher.membership
        assert any(x.get("dropped") for x in assignments(learner.store(), "ghost", ghost.registration))
        wait_for(lambda: a.got == [1])
        # Its name is free again, for anyone.
        assert learner.client("pod-a").register("ghost").registration > ghost.registration
    finally:
        a.close()


def test_a_dead_name_is_taken_over_by_another_pod(learner: Learner) -> None:
    learner.client("pod-a").register("crashed")  # never beats: dead after dead_after_s
    time.sleep(DEAD_AFTER_S + 0.5)
    assert learner.client("pod-b").register("crashed").registration > 0


def test_registrations_are_capped(learner: Learner) -> None:
    client = learner.client("pod-a")
    for i in range(3):
        client.register(f"r{i}")
    refused(lambda: client.register("r3"), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_replicas=3")
    refused(lambda: client.register("r3", "127.0.0.1:1", collective=False), grpc.StatusCode.RESOURCE_EXHAUSTED)
    client.register("r1")  # an existing name of the same caller is a replacement, not one more
    client.unregister("r2")
    client.register("r3", "127.0.0.1:1", collective=False)
    assert learner.publisher.membership.registered + len(learner.publisher._grpc.replicas) == 3


def test_a_push_address_must_be_the_callers_own_host(learner: Learner) -> None:
    client = learner.client("pod-b")
    refused(
        lambda: client.register("exfil", "203.0.113.9:50051", collective=False),
        grpc.StatusCode.PERMISSION_DENIED,
        "203.0.113.9",
        "own host",
    )
    assert "exfil" not in learner.publisher._grpc
    client.register("own-ip", "127.0.0.1:50051", collective=False)
    client.register("own-name", "localhost:50051", collective=False)
    assert {"own-ip", "own-name"} <= set(learner.publisher._grpc.replicas)


def test_a_store_write_announcing_a_petabyte_is_refused_before_allocating(
    learner: Learner, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocations: list[int] = []
    real = ReceiveBuffers._allocate

    def spy(self: ReceiveBuffers, nbytes: int) -> torch.Tensor:
        allocations.append(nbytes)
        return real(self, nbytes)

    monkeypatch.setattr(ReceiveBuffers, "_allocate", spy)
    petabyte = 1 << 50
    rogues = {
        # The model's own tensor, in a bucket of 1 PB.
        "padded bucket": {"tensors": [["embed.weight", "float32", [64, 32], 0, 0]], "bucket_sizes": [petabyte]},
        # A consistent manifest of a 1 PB tensor the model does not have.
        "foreign tensor": {"tensors": [["evil", "float32", [petabyte // 4], 0, 0]], "bucket_sizes": [petabyte]},
        # The model's names, one of them with a 1 PB shape.
        "huge shape": {"tensors": [["norm.weight", "float32", [petabyte // 4], 0, 0]], "bucket_sizes": [petabyte]},
    }
    a = subscribe(learner, "pod-a", "rollout-0")

    def registration() -> int:
        member = learner.publisher.membership._members.get("rollout-0")
        return member.registration if member is not None else -1

    try:
        wait_for(lambda: learner.publisher.replicas == ["rollout-0"])
        version = 1
        learner.publisher.publish(version, weights(version))
        wait_for(lambda: a.got == [1])
        for what, manifest in rogues.items():
            group = learner.publisher.membership.group
            assert group is not None and group.members, what
            before = registration()
            rogue = {"op": "update", "version": version + 1, "manifest": json.dumps(manifest), "checksum": ""}
            # Another replica of the group writes the next command key before the learner does.
            # (a replica holds the key: its write is signed).
            learner.publisher.membership.signer.put_json(
                learner.store(),  # type: ignore[arg-type]
                groups.command_key(group.epoch, group.seq + 1),
                rogue,
            )
            # Refused: the subscriber leaves and registers again (a new registration id) ...
            wait_for(lambda: registration() > before, 30)  # noqa: B023 - read at once
            assert all(n < petabyte for n in allocations), (what, allocations)
            # ... and goes on with the learner's real updates.
            version += 1
            learner.publisher.publish(version, weights(version))
            wait_for(lambda: a.got[-1] == version, 30)  # noqa: B023 - read at once
        assert allocations and max(allocations) < petabyte
    finally:
        a.close()
