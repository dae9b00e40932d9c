"""The `WeightTransport` interface: both backends implement all of it, the gRPC backend's
bookkeeping works against a stand-in push (no network), and the learner's loop and servicer
run against a small in-process transport — they never need to know which backend runs."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.loop import LearnerLoop, LoopSettings
from asyncopd.learner.servicer import LearnerServicer
from asyncopd.learner.trainer import StepStats
from asyncopd.v1 import learner_pb2 as pb
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.grpc_transport import GrpcPush
from asyncopd.weightsync.transport import PublishReport, Registration, Snapshot, WeightTransport
from asyncopd.wire.cache_client import Batch
from batch_source_stub import StubBatchSource

INTERFACE = sorted(WeightTransport.__abstractmethods__)


def _sample(n: int) -> SimpleNamespace:
    """What the loop reads of a trained sample it does not train itself: its ticket."""
    return SimpleNamespace(rollout=SimpleNamespace(ticket=f"run-{n}"))


def weights(step: int) -> list[tuple[str, torch.Tensor]]:
    return [("w", torch.full((4, 3), float(step))), ("b", torch.arange(5, dtype=torch.int64) + step)]


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_interface_is_a_handful_of_methods() -> None:
    assert sorted(["register", "unregister", "replicas", "latest_version", "publish", "sync", "close"]) == INTERFACE


@pytest.mark.parametrize("backend", [CollectiveBroadcast, GrpcPush])
def test_each_backend_implements_the_whole_interface(backend: type[WeightTransport]) -> None:
    assert issubclass(backend, WeightTransport)
    assert not inspect.isabstract(backend), backend.__abstractmethods__
    for name in INTERFACE:
        ours, theirs = getattr(WeightTransport, name), getattr(backend, name)
        if isinstance(ours, property):
            assert isinstance(theirs, property), f"{backend.__name__}.{name} must be a property"
            continue
        assert inspect.signature(theirs) == inspect.signature(ours), f"{backend.__name__}.{name}"


class Pushes:
    """A stand-in for PushWeights: records (address, version, tensors); addresses in `down` fail."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, dict[str, torch.Tensor]]] = []
        self.down: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, address: str, snapshot: Snapshot, timeout_s: float) -> None:
        if address in self.down:
            raise ConnectionError(f"{address} is gone")
        named = snapshot.manifest.unpack(snapshot.buckets)
        with self.lock:
            self.got.append((address, snapshot.version, {n: t.clone() for n, t in named}))

    def versions(self, address: str) -> list[int]:
        with self.lock:
            return [v for a, v, _ in self.got if a == address]


def test_grpc_backend_pushes_to_late_joiners_and_drops_the_unreachable() -> None:
    pushes = Pushes()
    transport = GrpcPush(WeightSyncConfig(timeout_s=2.0, checksum=True), push=pushes, maintenance_interval_s=0.02)
    try:
        assert transport.latest_version == -1
        with pytest.raises(ValueError, match="collective=false"):
            transport.register("r", collective=True)
        with pytest.raises(ValueError, match="address"):
            transport.register("r", collective=False)
        with pytest.raises(ValueError, match="non-empty"):
            transport.register("", address="a:1", collective=False)

        first = transport.register("r1", address="a:1", collective=False)
        assert (first.backend, first.version, first.store_port) == ("grpc", -1, 0)
        report = transport.publish(1, weights(1))
        assert (report.version, report.replicas, report.rebuilds) == (1, 1, 0)
        raw = sum(t.numel() * t.element_size() for _, t in weights(1))
        assert raw <= report.nbytes < raw + 16 * len(weights(1)), "the packed bytes, with 16-byte alignment"
        assert pushes.versions("a:1") == [1]
        _, _, got = pushes.got[-1]
        for name, tensor in weights(1):
            assert torch.equal(got[name], tensor)

        # A late joiner gets the current version from the maintenance thread, without a publish.
        assert transport.register("r2", address="a:2", collective=False).version == 1
        wait_for(lambda: pushes.versions("a:2") == [1])
        transport.publish(2, weights(2))
        assert pushes.versions("a:1") == [1, 2] and pushes.versions("a:2") == [1, 2]
        with pytest.raises(ValueError, match="not newer"):
            transport.publish(2, weights(2))

        pushes.down.add("a:1")  # the replica disappears: the next push fails and drops it
        transport.publish(3, weights(3))
        assert transport.replicas == ["r2"]
        assert pushes.versions("a:2") == [1, 2, 3]

        # A stale registration id does not remove the replica's newer registration.
        again = transport.register("r2", address="a:2", collective=False)
        assert again.registration > first.registration
        assert not transport.unregister("r2", first.registration)
        assert transport.unregister("r2", again.registration)
        assert transport.replicas == []
    finally:
        transport.close()


class InProcess(WeightTransport):
    """A stand-in transport: replicas are names, a publish copies the tensors into `delivered`."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.delivered: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.closed = False

    def register(
        self, replica: str, device: str = "cpu", address: str = "", collective: bool = True, owner: str = ""
    ) -> Registration:
        self.names[replica] = len(self.names) + 1
        return Registration("", 0, self.names[replica], 0, 1 + len(self.names), self.latest_version, "memory", 1.0)

    def unregister(self, replica: str, registration: int = 0, owner: str = "") -> bool:
        return self.names.pop(replica, None) is not None

    @property
    def replicas(self) -> list[str]:
        return sorted(self.names)

    @property
    def latest_version(self) -> int:
        return self.delivered[-1][0] if self.delivered else -1

    def publish(self, version: int, named: Sequence[tuple[str, torch.Tensor]]) -> PublishReport:
        self.delivered.append((version, {n: t.detach().clone() for n, t in named}))
        return PublishReport(version, len(self.names), sum(t.numel() for _, t in named), 0.0, 0.0, 0)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class CountingTrainer:
    """What the loop needs of a Trainer: a version, `train` (one step per batch) and the weights."""

    def __init__(self) -> None:
        self.version = 0
        self.prompt_cursor: dict[str, Any] | None = None
        self.weight = torch.zeros(3)

    def train(self, samples: list[Any]) -> list[StepStats]:
        self.weight += 1.0
        self.version += 1
        return [StepStats(self.version, len(samples), 10 * len(samples), 1e-3, 0.5, {"loss": 1.0 / self.version})]

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [("weight", self.weight)]


class Cache(StubBatchSource):
    """A BatchSource that always has two samples."""

    def batch(self, n: int, size: int) -> Batch:
        return Batch(batch_id=f"b{n}", samples=[_sample(n), _sample(n)], staleness=[0, 1])  # type: ignore[list-item]

    def ack_batch(self, batch_id: str) -> int:
        super().ack_batch(batch_id)
        return 2


class Context:
    """The little of a gRPC ServicerContext the servicer reads: a plain-TCP peer, no certificate."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def peer_identities(self) -> None:
        return None


def test_the_learner_loop_and_servicer_run_on_any_transport(tmp_path: Path) -> None:
    transport = InProcess()
    servicer = LearnerServicer(transport, lambda: None)
    reply = servicer.RegisterReplica(pb.RegisterReplicaRequest(replica="r", collective=False), Context())  # type: ignore[arg-type]
    assert (reply.registration, reply.backend, reply.world_size) == (1, "memory", 2)

    cache, trainer = Cache(), CountingTrainer()
    loop = LearnerLoop(
        trainer,  # type: ignore[arg-type]
        cache,
        transport,
        LoopSettings(steps=3, batch_size=2),
        stop=threading.Event(),
        step_log=tmp_path / "steps.jsonl",
    )
    loop.run()
    # Every version reaches the replicas (the starting one too) before the cache hears of it.
    assert [v for v, _ in transport.delivered] == [0, 1, 2, 3]
    assert [float(w["weight"][0]) for _, w in transport.delivered] == [0.0, 1.0, 2.0, 3.0]
    assert cache.versions == [0, 1, 2, 3, 3]
    assert '"broadcast": {"replicas": 1, "bytes": 3' in (tmp_path / "steps.jsonl").read_text()
    servicer.UnregisterReplica(pb.UnregisterReplicaRequest(replica="r"), Context())  # type: ignore[arg-type]
    assert transport.replicas == []


def test_a_lazy_snapshot_packs_its_buckets_in_order_on_demand_and_equals_an_eager_one() -> None:
    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.randn(100, generator=g)) for i in range(6)]  # 400 B each
    config = WeightSyncConfig(bucket_mb=800 / (1 << 20), checksum=False)  # two tensors a bucket
    eager = Snapshot.take(1, named, None, config, torch.device("cpu"))
    lazy = Snapshot.take(1, named, None, config, torch.device("cpu"), lazy=True)
    assert len(lazy.manifest.bucket_sizes) == 3
    assert lazy._buckets == []  # nothing packed yet
    assert torch.equal(lazy.bucket(1), eager.buckets[1])
    assert len(lazy._buckets) == 2  # bucket 1 needs bucket 0 first: the packing is in order
    assert [bytes(b.numpy()) for b in lazy.buckets] == [bytes(b.numpy()) for b in eager.buckets]
    assert lazy.pack_seconds > 0
    lazy.complete()  # idempotent once packed
    assert len(lazy.buckets) == 3

    # checksums need every byte first: a lazy request is packed at once, digests and all
    checked = WeightSyncConfig(bucket_mb=800 / (1 << 20), checksum=True)
    digested = Snapshot.take(1, named, None, checked, torch.device("cpu"), lazy=True)
    assert len(digested._buckets) == 3 and len(digested.bucket_digests) == 3

    # a tensor that does not match the layout it reuses is refused before anything is packed
    from asyncopd.weightsync.manifest import ManifestError

    wrong = [*named[:-1], ("w5", torch.randn(101, generator=g))]
    with pytest.raises(ManifestError, match="w5"):
        Snapshot.take(2, wrong, lazy, config, torch.device("cpu"), lazy=True)


def test_a_lazy_snapshot_of_gathered_weights_starts_the_followers_gather_when_it_packs() -> None:
    """Gathered weights (cast to the rollout dtype, tied weights once): a lazy snapshot tells the
    other ranks to gather (`before_gather`) when its first bucket is packed, not when it is
    taken, and once; its bytes are the eager snapshot's."""
    from asyncopd.weightsync.gather import GatheredWeights

    g = torch.Generator().manual_seed(1)
    embed = torch.randn(50, 4, generator=g)
    named = [("embed", embed), ("w", torch.randn(60, 4, generator=g)), ("lm_head", embed)]
    config = WeightSyncConfig(bucket_mb=400 / (1 << 20), checksum=False)
    starts: list[int] = []
    weights = GatheredWeights(named, dtype=torch.bfloat16, before_gather=lambda: starts.append(1))
    eager = Snapshot.take(1, GatheredWeights(named, dtype=torch.bfloat16), None, config, torch.device("cpu"))
    lazy = Snapshot.take(1, weights, None, config, torch.device("cpu"), lazy=True)
    assert [t.name for t in lazy.manifest.tensors] == ["embed", "w"]  # the tied head travels once
    assert len(lazy.manifest.bucket_sizes) == 2 and starts == []
    lazy.bucket(0)
    assert starts == [1]
    assert [bytes(b.numpy()) for b in lazy.buckets] == [bytes(b.numpy()) for b in eager.buckets]
    assert starts == [1]
