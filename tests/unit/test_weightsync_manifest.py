"""The weight-sync manifest's checks at their edges: every refusal `validate`, `check_fits`,
`check_against`, `pack` and `unpack` make, next to the closest layout they accept, and
`plan`'s bucket boundary. These are the fast tests `make mutate` runs against
weightsync/manifest.py (the round trips live in tests/service/test_weightsync_transport.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from asyncopd.weightsync.manifest import (
    Manifest,
    ManifestError,
    ParamSpec,
    TensorSpec,
    checksum,
    pack,
    param_specs,
    plan,
)

pytestmark = pytest.mark.unit


def spec(
    name: str, dtype: str = "float32", shape: tuple[int, ...] = (4,), bucket: int = 0, offset: int = 0
) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape, bucket=bucket, offset=offset)


def test_sizes_and_counts() -> None:
    t = spec("a", "bfloat16", (3, 5))
    assert (t.numel, t.nbytes) == (15, 30)
    assert spec("b", "bool", ()).numel == 1 and spec("c", "int64", (2, 0)).nbytes == 0
    assert ParamSpec((2, 3, 4)).numel == 24 and ParamSpec(()).numel == 1
    assert Manifest((spec("a"), spec("b", offset=16)), (32, 64)).total_bytes == 96
    assert param_specs({"w": [2, 3]}) == {"w": ParamSpec((2, 3), None)}


def test_plan_fills_a_bucket_exactly_and_aligns_offsets() -> None:
    # 10 bytes, aligned to 16, then 16 more: 32 bytes fit a 32-byte bucket, 33 do not
    named = [("a", torch.zeros(10, dtype=torch.uint8)), ("b", torch.zeros(16, dtype=torch.uint8))]
    fits = plan(named, 32)
    assert fits.bucket_sizes == (32,)
    assert [(t.bucket, t.offset) for t in fits.tensors] == [(0, 0), (0, 16)]
    split = plan(named, 31)
    assert split.bucket_sizes == (16, 16)
    assert [(t.bucket, t.offset) for t in split.tensors] == [(0, 0), (1, 0)]
    # a tensor larger than a bucket gets one of its own; the next starts a new one
    big = plan([("s", torch.zeros(1)), ("big", torch.zeros(100)), ("t", torch.zeros(1))], 64)
    assert [t.bucket for t in big.tensors] == [0, 1, 2] and big.bucket_sizes == (16, 400, 16)
    assert all(
        t.offset % 16 == 0
        for t in plan([(f"x{i}", torch.zeros(i + 1, dtype=torch.int8)) for i in range(9)], 256).tensors
    )
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan(named, 0)
    with pytest.raises(ManifestError, match="complex"):
        plan([("z", torch.zeros(2, dtype=torch.complex64))], 64)


GOOD = Manifest((spec("a"), spec("b", offset=16)), (32,))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tensors": (spec("a"), spec("a", offset=16))}, "twice"),
        ({"tensors": (spec("a"), spec("b", "complex64", offset=16))}, "unknown dtype"),
        ({"tensors": (spec("a"), spec("b", shape=(-4,), offset=16))}, "negative"),
        ({"tensors": (spec("a"), spec("b", offset=16, bucket=1))}, "names bucket 1"),
        ({"tensors": (spec("a"), spec("b", offset=16, bucket=-1))}, "names bucket -1"),
        ({"tensors": (spec("a"), spec("b", offset=8))}, "does not fit"),  # misaligned (and overlapping)
        ({"tensors": (spec("a"), spec("b", offset=32))}, "does not fit"),  # one past the end
        ({"tensors": (spec("a"), spec("b", shape=(5,), offset=16))}, "does not fit"),
        ({"bucket_sizes": (48,)}, "announces 48 bytes"),  # larger than its tensors packed
        ({"tensors": (spec("a", shape=(8,)), spec("b", offset=16))}, "overlap"),
    ],
)
def test_validate_refuses_each_broken_layout(change: dict[str, object], needle: str) -> None:
    GOOD.validate()
    broken = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=needle):
        broken.validate()
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_json(broken.to_json())


def test_validate_accepts_the_closest_good_layouts() -> None:
    Manifest((spec("a", shape=(3,)), spec("b", offset=16)), (32,)).validate()  # 12 bytes, padded to 16
    Manifest((spec("a", shape=(0,)),), (0,)).validate()  # an empty tensor in an empty bucket
    Manifest((spec("a"), spec("b", bucket=1)), (16, 16)).validate()  # same offset, other bucket
    Manifest((spec("b", offset=16), spec("a")), (32,)).validate()  # listed out of place order
    assert Manifest.from_json(GOOD.to_json()) == GOOD


def test_check_fits_names_what_the_model_does_not_hold() -> None:
    model = {"a": ParamSpec((4,), "float32"), "b": ParamSpec((4,))}
    GOOD.check_fits(model)
    GOOD.check_fits({**model, "extra": ParamSpec((1,))})  # an update may carry a subset
    with pytest.raises(ManifestError, match=r"'b'.*does not have"):
        GOOD.check_fits({"a": model["a"]})
    with pytest.raises(ManifestError, match=r"'a'.*shape \(4,\).*\(5,\)"):
        GOOD.check_fits({**model, "a": ParamSpec((5,), "float32")})
    with pytest.raises(ManifestError, match=r"'a'.*needs float16"):
        GOOD.check_fits({**model, "a": ParamSpec((4,), "float16")})
    ints = Manifest((spec("a"), spec("b", "int32", offset=16)), (32,))
    with pytest.raises(ManifestError, match=r"'b'.*floating-point"):
        ints.check_fits(model)
    assert ParamSpec((1,)).admits(torch.bfloat16) and not ParamSpec((1,)).admits(torch.int64)
    assert ParamSpec.of(torch.zeros(2, 3, dtype=torch.int16)) == ParamSpec((2, 3), "int16")
    with pytest.raises(ManifestError, match="cannot travel"):
        ParamSpec.of(torch.zeros(1, dtype=torch.complex64))


def test_check_against_names_missing_unexpected_and_different() -> None:
    expected = {"a": ("float32", (4,)), "b": ("float32", (4,))}
    GOOD.check_against(expected)
    for wrong, needle in (
        ({"a": expected["a"]}, r"unexpected \['b'\]"),
        ({**expected, "c": ("float32", (1,))}, r"missing \['c'\]"),
        ({**expected, "b": ("float16", (4,))}, "differs for.*'b'"),
        ({**expected, "b": ("float32", (2, 2))}, "differs for.*'b'"),
    ):
        with pytest.raises(ManifestError, match=needle):
            GOOD.check_against(wrong)  # type: ignore[arg-type]


def test_pack_and_unpack_refuse_what_the_manifest_does_not_say() -> None:
    named = [("a", torch.arange(4, dtype=torch.float32)), ("b", torch.ones(4))]
    buckets = pack(named, GOOD, "cpu")
    assert [(n, t.tolist()) for n, t in GOOD.unpack(buckets)] == [(n, t.tolist()) for n, t in named]
    with pytest.raises(ManifestError, match="4 tensors given, manifest lists 2"):
        pack(named * 2, GOOD, "cpu")
    with pytest.raises(ManifestError, match="'c'"):
        pack([named[0], ("c", torch.ones(4))], GOOD, "cpu")
    with pytest.raises(ManifestError, match="'b'"):
        pack([named[0], ("b", torch.ones(2, 2))], GOOD, "cpu")
    with pytest.raises(ManifestError, match="bucket sizes"):
        GOOD.unpack([torch.zeros(31, dtype=torch.uint8)])
    with pytest.raises(ManifestError, match="bucket sizes"):
        GOOD.unpack([buckets[0], torch.zeros(0, dtype=torch.uint8)])


def test_checksum_covers_every_byte_of_every_bucket() -> None:
    buckets = [torch.zeros(8, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8)]
    digest = checksum(buckets)
    assert len(digest) == 32 and digest == checksum([b.clone() for b in buckets])
    for i in range(2):
        for j in (0, -1):
            changed = [b.clone() for b in buckets]
            changed[i][j] += 1
            assert checksum(changed) != digest, (i, j)
    assert checksum(buckets[:1]) != digest


def test_specs_are_hashable_values() -> None:
    # a receiver's model specs are built once and shared by every update it checks
    assert len({ParamSpec((2,)), ParamSpec((2,)), spec("a"), spec("a")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParamSpec((2,)).shape = (3,)  # type: ignore[misc]


def test_gaps_are_exactly_the_bytes_no_tensor_covers() -> None:
    named = [
        ("a", torch.zeros(3, dtype=torch.uint8)),  # 3 bytes, then 13 of padding
        ("b", torch.zeros(5, dtype=torch.float16)),  # 10 bytes at 16
        ("c", torch.zeros(40, dtype=torch.float32)),  # 160 bytes: a bucket of its own at 64
        ("d", torch.zeros(2, dtype=torch.int64)),
    ]
    m = plan(named, 64)
    for k, size in enumerate(m.bucket_sizes):
        covered = bytearray(size)
        for t in m.tensors:
            if t.bucket == k:
                covered[t.offset : t.offset + t.nbytes] = b"\x01" * t.nbytes
        naive = [i for i in range(size) if not covered[i]]
        assert [i for start, end in m.gaps[k] for i in range(start, end)] == naive
    assert any(m.gaps)  # the layout above has padding to zero


def test_pack_writes_every_byte_whatever_memory_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets are allocated without zeroing and only their padding is cleared: packing into
    memory full of old bytes gives what packing into zeroed buckets gives (checksums and deltas
    depend on it)."""
    named = [
        ("a", torch.arange(3, dtype=torch.uint8)),
        ("b", torch.randn(5).to(torch.float16)),
        ("c", torch.randn(40)),
        ("d", torch.tensor([7, -1])),
    ]
    m = plan(named, 64)
    want = [torch.zeros(size, dtype=torch.uint8) for size in m.bucket_sizes]
    for (_, tensor), s in zip(named, m.tensors, strict=True):
        want[s.bucket][s.offset : s.offset + s.nbytes] = tensor.reshape(-1).view(torch.uint8)
    empty = torch.empty

    def dirty(*args: object, **kwargs: object) -> torch.Tensor:
        return empty(*args, **kwargs).fill_(0xAB)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "empty", dirty)
    got = pack(named, m, "cpu")
    assert [bytes(b.numpy()) for b in got] == [bytes(b.numpy()) for b in want]
