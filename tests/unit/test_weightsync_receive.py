"""The receive stream of one update, on an in-memory stand-in for the broadcast: two buffers,
bucket k + 2 received only once the load moved past bucket k, every byte delivered bit-exact,
checksums checked per bucket, an abandoned broadcast ends the stream."""

from __future__ import annotations

import pytest
import torch
from asyncopd.weightsync.manifest import ManifestError, checksum, pack, plan
from asyncopd.weightsync.receive import Abandoned, Incomplete, ReceiveBuffers, WeightStream


def model() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (f"layers.{i}.w", torch.randn(64, 32, generator=g).to(torch.bfloat16 if i % 2 else torch.float32))
        for i in range(7)
    ]


class Wire:
    """Delivers the learner's packed buckets in order, logging what is posted and when."""

    def __init__(self, buckets: list[torch.Tensor], abandon_at: int = -1) -> None:
        self.buckets, self.abandon_at = buckets, abandon_at
        self.posted: list[int] = []
        self.log: list[str] = []

    def receive(self, into: torch.Tensor) -> int:
        k = len(self.posted)
        self.posted.append(k)
        self.log.append(f"post {k}")
        into.copy_(self.buckets[k])
        return k

    def wait(self, k: int) -> bool:
        return k != self.abandon_at


def stream_for(wire: Wire, buffers: ReceiveBuffers, manifest, digests=()):  # type: ignore[no-untyped-def]
    return WeightStream(manifest, buffers, wire.receive, wire.wait, digests)


def test_two_buffers_carry_every_bucket_and_the_next_waits_for_the_load() -> None:
    named = model()
    manifest = plan(named, 4096)  # one tensor per bucket (8 KiB / 4 KiB tensors)
    buckets = pack(named, manifest, "cpu")
    assert len(buckets) == 7
    wire, buffers = Wire(buckets), ReceiveBuffers()
    stream = stream_for(wire, buffers, manifest, [checksum([b]) for b in buckets])
    seen = []
    for name, tensor in stream:
        wire.log.append(f"load {name}")
        seen.append((name, tensor.clone()))
    stream.drain()
    assert stream.complete
    for (name, got), (want_name, want) in zip(seen, named, strict=True):
        assert name == want_name and got.dtype == want.dtype and torch.equal(got, want)
    # bucket k + 2 goes into bucket k's buffer only after the load asked past bucket k
    for k in range(2, 7):
        assert wire.log.index(f"post {k}") > wire.log.index(f"load layers.{k - 2}.w")
        assert wire.log.index(f"post {k}") < wire.log.index(f"load layers.{k - 1}.w")
    assert buffers.allocations == 2 and buffers.nbytes == 2 * max(manifest.bucket_sizes)
    # a second update of the same model reuses them (and their views)
    again = stream_for(Wire(buckets), buffers, manifest)
    again.drain()
    assert buffers.allocations == 2


def test_an_unread_stream_is_drained_and_a_bad_checksum_or_abandon_ends_it() -> None:
    named = model()
    manifest = plan(named, 4096)
    buckets = pack(named, manifest, "cpu")
    wire = Wire(buckets)
    stream_for(wire, ReceiveBuffers(), manifest).drain()
    assert wire.posted == list(range(7))
    digests = [checksum([b]) for b in buckets]
    digests[3] = "0" * 32
    bad = stream_for(Wire(buckets), ReceiveBuffers(), manifest, digests)
    with pytest.raises(ManifestError, match="bucket 3"):
        for _ in bad:
            pass
    assert not bad.complete
    gone = stream_for(Wire(buckets, abandon_at=2), ReceiveBuffers(), manifest)
    with pytest.raises(Abandoned):
        gone.drain()
    with pytest.raises(Incomplete):
        gone.drain()
