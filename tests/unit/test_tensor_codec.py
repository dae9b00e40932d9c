"""The tensor codec round-trips every wire dtype, empty and large tensors, and rejects bad bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asyncopd.v1 import common_pb2 as pb
from asyncopd.wire import WireError, decode_numpy, decode_torch, encode

pytestmark = pytest.mark.unit

NUMPY_DTYPES = ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 0, 2), (4, 5)])
def test_numpy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 50).astype(dtype)
    msg = pb.Tensor.FromString(encode(a).SerializeToString())
    b = decode_numpy(msg)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    t = decode_torch(msg)
    assert tuple(t.shape) == shape
    np.testing.assert_array_equal(t.numpy(), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool])
def test_torch_round_trip(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    y = decode_torch(encode(x))
    assert y.dtype == dtype
    assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_torch_scalar_round_trip(dtype: torch.dtype) -> None:
    x = torch.tensor(3).to(dtype)
    y = decode_torch(encode(x))
    assert y.shape == () and y.dtype == dtype and torch.equal(x, y)


def test_bfloat16_numpy_decode_widens_exactly() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    a = decode_numpy(encode(x))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, x.float().numpy())


def test_cast_on_encode() -> None:
    a = np.array([-0.5, -1.25, -3.0], dtype=np.float32)
    msg = encode(a, "float16")
    assert msg.dtype == pb.DTYPE_FLOAT16
    assert len(msg.data) == 6
    np.testing.assert_array_equal(decode_numpy(msg), a.astype(np.float16))


def test_big_endian_input_is_stored_little_endian() -> None:
    a = np.arange(4, dtype=">i4")
    msg = encode(a)
    assert msg.data == np.arange(4, dtype="<i4").tobytes()


def test_large_tensor_decode_is_zero_copy() -> None:
    a = np.arange(4_000_000, dtype=np.float32)
    msg = encode(a)
    b = decode_numpy(msg)
    assert not b.flags.owndata and not b.flags.writeable
    assert b[-1] == a[-1]


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "not a valid tensor dtype"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "not a valid tensor dtype"),  # type: ignore[arg-type]
        (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2], data=b"\0" * 7), "needs 8"),
        (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[-1], data=b""), "negative dimension"),
        (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1] * 9, data=b"\0" * 4), "at most 8"),
    ],
)
def test_malformed_tensors_are_rejected(msg: pb.Tensor, needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        decode_numpy(msg, "x")
    with pytest.raises(WireError, match=needle):
        decode_torch(msg, "x")


def test_element_limit() -> None:
    with pytest.raises(WireError, match="exceed the limit"):
        decode_numpy(encode(np.zeros(10, np.int32)), "x", max_elements=9)
