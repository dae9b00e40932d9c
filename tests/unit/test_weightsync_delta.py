"""Delta encoding of weight buckets against naive formulas, and its decoding on the receive side.

Properties: decoding a delta over the previous bucket gives the new bucket byte for byte; the
encoding chosen is the smallest by the naive byte counts (dense on ties, so never larger than
the bucket); sparse and bitmask payloads decode like a plain Python loop over their bytes; a
receiver's base buckets take a delta only against the version they hold.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync.delta import (
    ENCODINGS,
    DeltaError,
    choose,
    decode_into,
    encode,
    pack_bits,
    pack_bits_torch,
    payload_bytes,
    unpack_bits,
    unpack_bits_torch,
)
from asyncopd.weightsync.manifest import checksum
from asyncopd.weightsync.receive import BaseBuckets, ReceiveBuffers, WeightStream
from asyncopd.weightsync.transport import Delta, Snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def naive_sizes(words: int, changed: int) -> dict[str, int]:
    """Bytes of each form, counted by hand: 2 bytes a word; int32 index + int16 value; one bit a word."""
    return {
        "dense": 2 * words,
        "sparse": 4 * changed + 2 * changed,
        "bitmask": 2 * -(-words // 16) + 2 * changed,
    }


def naive_decode(previous: bytes, encoding: str, changed: int, payload: bytes) -> bytes:
    """The new bucket from its delta, one word at a time in plain Python."""
    words = [previous[i : i + 2] for i in range(0, len(previous), 2)]
    if encoding == "dense":
        return payload
    if encoding == "sparse":
        index = [int.from_bytes(payload[4 * j : 4 * j + 4], "little") for j in range(changed)]
        values = [payload[4 * changed + 2 * j : 4 * changed + 2 * j + 2] for j in range(changed)]
    else:
        mask_bytes = 2 * -(-len(words) // 16)
        index = [i for i in range(len(words)) if payload[i // 8] >> (i % 8) & 1]
        values = [payload[mask_bytes + 2 * j : mask_bytes + 2 * j + 2] for j in range(len(index))]
    for i, v in zip(index, values, strict=True):
        words[i] = v
    return b"".join(words)


def changed_bucket(words: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 bucket and a copy with about `fraction` of its words changed."""
    g = torch.Generator().manual_seed(seed)
    previous = torch.randn(words, generator=g).to(torch.bfloat16)
    new = previous.clone()
    flip = torch.rand(words, generator=g) < fraction
    new[flip] = (torch.randn(int(flip.sum()), generator=g) * 3).to(torch.bfloat16)
    return previous.view(torch.uint8), new.view(torch.uint8)


@settings(max_examples=150, deadline=None)
@given(
    words=st.integers(min_value=1, max_value=700),
    fraction=st.sampled_from([0.0, 0.001, 0.01, 0.03, 0.05, 0.3, 0.9, 0.95, 1.0]),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_decoding_a_delta_over_the_previous_bucket_gives_the_new_one(words: int, fraction: float, seed: int) -> None:
    previous, new = changed_bucket(words, fraction, seed)
    delta = encode(previous, new)
    old_words, new_words = previous.view(torch.int16).tolist(), new.view(torch.int16).tolist()
    changed = sum(a != b for a, b in zip(old_words, new_words, strict=True))
    sizes = naive_sizes(words, changed)
    assert delta.changed == changed
    assert delta.nbytes == sizes[delta.encoding] == payload_bytes(delta.encoding, words, changed)
    # the smallest form; dense when nothing is strictly smaller than the bucket
    assert delta.nbytes == min(sizes.values()) <= new.numel()
    assert delta.encoding == "dense" or delta.nbytes < sizes["dense"]
    want = bytes(new.tolist())
    assert naive_decode(bytes(previous.tolist()), delta.encoding, changed, bytes(delta.payload.tolist())) == want
    base = previous.clone()
    assert bytes(decode_into(base, delta.encoding, delta.changed, delta.payload).tolist()) == want
    assert torch.equal(base, new)


def test_each_encoding_is_chosen_where_it_is_smallest() -> None:
    n = 32_000
    assert choose(n, 0) == "sparse"
    assert choose(n, n // 32 - 1) == "sparse" and choose(n, n // 32 + 1) == "bitmask"
    assert choose(n, n * 15 // 16 - 1) == "bitmask" and choose(n, n) == "dense"
    assert choose(16, 15) == "dense"  # 2 + 30 == 32 bytes: a tie is dense
    for fraction, encoding in ((0.005, "sparse"), (0.2, "bitmask"), (0.99, "dense")):
        previous, new = changed_bucket(n, fraction, seed=1)
        assert encode(previous, new).encoding == encoding, fraction


@settings(max_examples=50, deadline=None)
@given(words=st.integers(min_value=0, max_value=300), seed=st.integers(min_value=0, max_value=1000))
def test_the_device_agnostic_bit_packing_matches_numpys(words: int, seed: int) -> None:
    mask = torch.rand(words, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = pack_bits(mask)  # numpy on the CPU
    assert packed.numel() == 2 * -(-words // 16)
    assert torch.equal(pack_bits_torch(mask), packed)
    assert torch.equal(unpack_bits_torch(packed, words), mask) and torch.equal(unpack_bits(packed, words), mask)


def test_bits_not_numbers_are_compared() -> None:
    previous = torch.tensor([0.0, 1.0, float("nan")], dtype=torch.bfloat16)
    new = torch.tensor([-0.0, 1.0, float("nan")], dtype=torch.bfloat16)
    new.view(torch.int16)[2] += 1  # another NaN payload
    delta = encode(previous.view(torch.uint8), new.view(torch.uint8))
    assert delta.changed == 2
    base = previous.view(torch.uint8).clone()
    assert torch.equal(decode_into(base, delta.encoding, delta.changed, delta.payload), new.view(torch.uint8))


def test_a_delta_that_does_not_fit_the_bucket_is_refused() -> None:
    previous, new = changed_bucket(1000, 0.01, seed=2)
    delta = encode(previous, new)
    assert delta.encoding == "sparse"
    with pytest.raises(DeltaError, match="payload"):
        decode_into(previous.clone(), "sparse", delta.changed + 1, delta.payload)
    with pytest.raises(DeltaError, match="changed words"):
        decode_into(previous.clone(), "sparse", 10_000, delta.payload)
    bad = delta.payload.clone()
    bad[:4].view(torch.int32)[0] = 1000  # index past the bucket's 1000 words
    with pytest.raises(DeltaError, match="outside"):
        decode_into(previous.clone(), "sparse", delta.changed, bad)
    with pytest.raises(DeltaError, match="unknown"):
        payload_bytes("zip", 10, 1)  # type: ignore[arg-type]
    assert set(ENCODINGS) == {"dense", "sparse", "bitmask"}


def model(step: int) -> list[tuple[str, torch.Tensor]]:
    """bf16 weights, a fraction of them nudged per step (an fp32 tensor and a frozen one too)."""
    g = torch.Generator().manual_seed(0)
    named = [(f"layers.{i}.w", (torch.randn(64, 32, generator=g) * 0.02).to(torch.bfloat16)) for i in range(6)] + [
        ("norm", torch.ones(32)),
        ("frozen", torch.randn(128, generator=g).to(torch.bfloat16)),
    ]
    for s in range(1, step + 1):
        gs = torch.Generator().manual_seed(s)
        for name, tensor in named[:-1]:
            if name == "norm":
                tensor.add_(1e-3 * s)
            else:
                hit = torch.rand(tensor.shape, generator=gs) < 0.02
                tensor[hit] = tensor[hit] + 0.01
    return named


def test_a_receiver_decodes_deltas_into_its_base_and_only_against_the_version_it_holds() -> None:
    config = WeightSyncConfig(bucket_mb=4096 / (1 << 20))
    snapshots = [Snapshot.take(0, model(0), None, config, torch.device("cpu"))]
    for v in (1, 2, 3):
        snapshots.append(Snapshot.take(v, model(v), snapshots[-1], config, torch.device("cpu")))
    manifest = snapshots[0].manifest
    assert all(s.manifest is manifest for s in snapshots) and len(manifest.bucket_sizes) > 2
    buffers, base = ReceiveBuffers(), BaseBuckets()

    def deliver(payloads: list[torch.Tensor], forms: list[tuple[str, int]], digests: list[str]) -> dict:  # type: ignore[type-arg]
        sent = iter(p for p in payloads if p.numel())

        def receive(into: torch.Tensor) -> bool:
            into.copy_(next(sent))
            return True

        base.begin(manifest)
        stream = WeightStream(
            manifest,
            buffers,
            receive,
            lambda _: True,
            digests,
            payload_sizes=[int(p.numel()) for p in payloads],
            land=lambda k, data: base.land(k, data, *forms[k]),  # type: ignore[arg-type]
        )
        got = {name: t.clone() for name, t in stream}
        stream.drain()
        return got

    first = snapshots[0]
    deliver(first.buckets, [("dense", 0)] * len(first.buckets), [])
    base.finish(0)
    sent = dense = 0
    for previous, snapshot in itertools.pairwise(snapshots):
        delta = Delta.between(previous, snapshot)
        assert delta is not None and delta.base_version == previous.version
        assert base.holds(delta.base_version, manifest) and not base.holds(snapshot.version, manifest)
        digests = [checksum([b]) for b in snapshot.buckets]  # of the dense buckets: checks the decode
        got = deliver([b.payload for b in delta.buckets], [(b.encoding, b.changed) for b in delta.buckets], digests)
        base.finish(snapshot.version)
        for name, tensor in model(snapshot.version):
            assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), (snapshot.version, name)
        sent += delta.nbytes
        dense += snapshot.nbytes
    assert {b.encoding for b in delta.buckets} >= {"sparse", "bitmask"}, [b.encoding for b in delta.buckets]
    assert sent < dense / 2, (sent, dense)
    assert base.allocations == 1 and base.nbytes == manifest.total_bytes
    # the learner sends it only to a group that holds exactly its base version
    assert delta.applies_to([2, 2]) and not delta.applies_to([2, 1]) and not delta.applies_to([2, -1])
    assert not delta.applies_to([3]) and not delta.applies_to([])
    # mid-update the base holds no version: a delta against the old one no longer applies
    base.begin(manifest)
    assert not base.holds(3, manifest) and not base.holds(-1, manifest)
    # a new layout is not the base's either
    assert not BaseBuckets().holds(0, manifest)
