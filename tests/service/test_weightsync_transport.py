"""Bucket layout and the gRPC fallback transport of weight sync.

The gRPC test runs a real RolloutService server whose PushWeights feeds `WeightAssembler`
(the receiver this package offers), with the collective transport pushing to a replica that
registered with collective=false.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.v1 import rollout_pb2 as pb
from asyncopd.v1 import rollout_pb2_grpc as pb_grpc
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.grpc_transport import GrpcPush, WeightAssembler, chunks, push_weights
from asyncopd.weightsync.manifest import ManifestError, ParamSpec, checksum, pack, plan
from asyncopd.weightsync.transport import transport_from_config
from asyncopd.wire.rpc import start_server, status_errors
from waiting import returns_within

pytestmark = pytest.mark.service


def model() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("embed", torch.randn(300, 40, generator=g)),
        ("norm", torch.randn(40, generator=g).to(torch.bfloat16)),
        ("scalar", torch.tensor(3.5, dtype=torch.float64)),
        ("ids", torch.arange(7, dtype=torch.int32)),
        ("flags", torch.tensor([True, False, True])),
        ("big_1d", torch.randn(50_000, generator=g).to(torch.float16)),
    ]


def specs(named: list[tuple[str, torch.Tensor]]) -> dict[str, ParamSpec]:
    return {name: ParamSpec.of(tensor) for name, tensor in named}


@pytest.mark.parametrize("bucket_bytes", [64, 4096, 1 << 20])
def test_buckets_round_trip_every_dtype_bit_exact(bucket_bytes: int) -> None:
    named = model()
    manifest = plan(named, bucket_bytes)
    assert all(size <= max(bucket_bytes, 100_000 + 16) for size in manifest.bucket_sizes)
    buckets = pack(named, manifest, "cpu")
    named[0][1].add_(1.0)  # the snapshot does not follow later training steps
    out = dict(manifest.unpack(buckets))
    for name, tensor in model():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor), name
    assert checksum(buckets) == checksum(pack(model(), manifest, "cpu"))
    buckets[-1][0] ^= 1
    assert checksum(buckets) != checksum(pack(model(), manifest, "cpu"))


def test_manifest_json_is_validated() -> None:
    manifest = plan(model(), 4096)
    assert type(manifest).from_json(manifest.to_json()) == manifest
    broken = manifest.to_json().replace('"embed"', '"norm"')
    with pytest.raises(ManifestError, match="twice"):
        type(manifest).from_json(broken)


def test_chunks_slice_large_tensors_and_reassemble() -> None:
    named = model()
    stream = list(chunks(5, named, chunk_mb=0.01, checksum=True))
    assert len(stream) > len(named)  # embed and big_1d were sliced
    assembler = WeightAssembler(specs(named), current=4, newest=5)
    for chunk in stream:
        assembler.add(chunk)
    version, out = assembler.finish()
    assert version == 5
    for (name, got), (_, want) in zip(out, named, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name

    missing = WeightAssembler(specs(named), current=4, newest=5)
    for chunk in stream[:-2] + stream[-1:]:
        missing.add(chunk)
    with pytest.raises(ManifestError, match="big_1d"):
        missing.finish()


class Receiver(pb_grpc.RolloutServiceServicer):
    """A RolloutService that only takes weight pushes (what a replica without a collective does)."""

    def __init__(self) -> None:
        self.updates: list[tuple[int, list[tuple[str, torch.Tensor]]]] = []

    @status_errors
    def PushWeights(  # noqa: N802
        self, request_iterator: Iterator[pb.WeightChunk], context: grpc.ServicerContext
    ) -> pb.PushWeightsResponse:
        held = self.updates[-1][0] if self.updates else 0
        assembler = WeightAssembler(specs(model()), current=held, newest=held + 1)
        for chunk in request_iterator:
            assembler.add(chunk)
        version, named = assembler.finish()
        self.updates.append((version, named))
        return pb.PushWeightsResponse(version=version, tensors=len(named))


def test_publisher_pushes_over_grpc_to_non_collective_replicas() -> None:
    receiver = Receiver()
    server = start_server(
        ServerConfig(port=0), [lambda s: pb_grpc.add_RolloutServiceServicer_to_server(receiver, s)], []
    )
    publisher = CollectiveBroadcast(
        WeightSyncConfig(timeout_s=5.0, checksum=True),
        grpc_push=lambda address, snapshot, timeout: push_weights(address, snapshot, timeout, chunk_mb=0.01),
    )
    try:
        publisher.publish(1, model())
        publisher.register("grpc-replica", address=server.address, collective=False)
        deadline = time.monotonic() + 20
        while not receiver.updates and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [v for v, _ in receiver.updates] == [1]  # a late joiner gets the current version
        publisher.publish(2, [(n, t + 1) if t.is_floating_point() else (n, t) for n, t in model()])
        assert [v for v, _ in receiver.updates] == [1, 2]
        got = dict(receiver.updates[-1][1])
        assert torch.equal(got["embed"], model()[0][1] + 1)
        assert publisher.replicas == ["grpc-replica"]
        server.stop(0)  # the replica disappears: the next push fails and drops it, never hangs
        # never hangs: the push fails at once or within timeout_s (5 s); 60 s detects a hang
        returns_within(60.0, lambda: publisher.publish(3, model()), "publish to a replica that is gone")
        assert publisher.replicas == []
    finally:
        publisher.close()
        server.stop(0)


def test_the_factory_picks_the_backend_and_the_grpc_one_needs_no_collective() -> None:
    collective = transport_from_config(WeightSyncConfig(timeout_s=5.0))
    try:
        assert isinstance(collective, CollectiveBroadcast)
        assert collective.register("c", collective=True).store_port == collective.store_port > 0
    finally:
        collective.close()

    receiver = Receiver()
    server = start_server(
        ServerConfig(port=0), [lambda s: pb_grpc.add_RolloutServiceServicer_to_server(receiver, s)], []
    )
    transport = transport_from_config(WeightSyncConfig(transport="grpc", timeout_s=5.0, grpc_chunk_mb=0.01))
    try:
        assert isinstance(transport, GrpcPush)
        with pytest.raises(ValueError, match=r"weightsync\.transport=grpc"):
            transport.register("collective-replica", collective=True)
        transport.publish(1, model())
        transport.register("grpc-replica", address=server.address, collective=False)
        deadline = time.monotonic() + 20
        while not receiver.updates and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [v for v, _ in receiver.updates] == [1]  # a late joiner gets the current version
        report = transport.publish(2, model())
        assert (report.replicas, [v for v, _ in receiver.updates]) == (1, [1, 2])
        for (name, got), (_, want) in zip(receiver.updates[-1][1], model(), strict=True):
            assert torch.equal(got, want), name
    finally:
        transport.close()
        server.stop(0)
