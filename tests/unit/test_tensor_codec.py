"""The tensor codec round-trips every wire dtype, empty and large tensors, and rejects bad bytes."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 2000)])  # (3, 2000): past the size torch casts
def test_numpy_bfloat16_encode_gives_torchs_bits(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    a = np.asarray(rng.standard_normal(shape) * 1e3, dtype=np.float64)
    if a.size >= 6:
        a.flat[:6] = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.0 * 2.0**-133]  # float32 subnormals
    msg = encode(a, "bfloat16")
    want = encode(torch.from_numpy(a.astype(np.float32)), "bfloat16")
    assert (msg.dtype, list(msg.shape)) == (want.dtype, list(want.shape))
    # Same bits, except a NaN's payload: torch's vectorised cast writes 0xFFFF, its scalar one 0x7FC0.
    got, ref = np.frombuffer(msg.data, np.uint16), np.frombuffer(want.data, np.uint16)
    nan = np.isnan(a.reshape(-1))
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.isnan(decode_numpy(msg).reshape(-1)[nan]).all()


def test_numpy_bfloat16_encode_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from asyncopd.wire import encode\n"
        "msg = encode(np.linspace(-2, 2, 5000, dtype=np.float32), 'bfloat16')\n"
        "print(len(msg.data), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["10000", "False"]


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


def _awkward_floats() -> np.ndarray:
    """Values where float casts differ if they differ anywhere: signed zeros, float16 subnormals
    and overflow, infinities, NaN, halfway cases of both half formats, and a wide random spread."""
    rng = np.random.default_rng(3)
    special = [0.0, -0.0, 1e-8, -6e-8, 6.1e-5, 65504.0, 65520.0, 70000.0, -1e30, np.inf, -np.inf, np.nan]
    ties = [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(2.0 + 2.0**-7)]
    ties += [1.0 + 2.0**-11 + 2.0**-40, -(1.0 + 2.0**-11 + 2.0**-40)]  # rounded twice via float32: down
    spread = rng.standard_normal(8192) * np.exp(rng.uniform(-30.0, 14.0, 8192))
    return np.concatenate([special, ties, spread, -rng.random(2048) * 30.0])


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-identical, NaN payloads aside (NaN where NaN)."""
    nan_a = np.isnan(a.view(np.float16) if a.dtype == np.uint16 else a)
    nan_b = np.isnan(b.view(np.float16) if b.dtype == np.uint16 else b)
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(
        a.view(np.uint8).reshape(a.size, -1)[~nan_a], b.view(np.uint8).reshape(b.size, -1)[~nan_b]
    )


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_half_casts_through_torch_give_numpys_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cast_into`/`to_float32` go through torch when it is loaded (much faster from a few
    thousand elements on); the bits are those numpy gives (bfloat16: round to nearest even, as
    `torch.Tensor.bfloat16`). Small arrays stay with numpy."""
    from asyncopd.wire import tensors

    class Counting:  # torch, counting the arrays it is handed
        calls = 0

        def __getattr__(self, name: str) -> object:
            return getattr(torch, name)

        def from_numpy(self, a: np.ndarray) -> torch.Tensor:
            Counting.calls += 1
            return torch.from_numpy(a)

    x64 = _awkward_floats()
    x32 = x64.astype(np.float32)
    assert x32[::2].size >= tensors._TORCH_MIN_ELEMENTS  # every source below is large enough for torch
    sources = {
        "float32": x32,
        "float32, strided": x32[::2],
        "read-only": np.frombuffer(x32.tobytes(), np.float32),
    }
    with np.errstate(over="ignore", invalid="ignore"):
        for src in sources.values():
            for bf16 in (False, True):
                outs = []
                for loaded in (Counting(), None):
                    monkeypatch.setattr(tensors, "loaded_torch", lambda loaded=loaded: loaded)
                    dest = np.empty(src.shape, np.uint16 if bf16 else np.float16)
                    tensors.cast_into(dest, src, bfloat16=bf16)
                    outs.append(dest)
                _same(*outs)
        half = x32.astype(np.float16)
        widened = []
        for loaded in (Counting(), None):
            monkeypatch.setattr(tensors, "loaded_torch", lambda loaded=loaded: loaded)
            widened.append(tensors.to_float32(np.frombuffer(half.tobytes(), np.float16)))
        _same(*widened)
    assert Counting.calls == 2 * (2 * len(sources) + 1)  # the torch side really ran: 2 arrays a cast
    # float64 stays with numpy: torch narrows a double through float (rounding twice), so a value
    # just above a float16 halfway point would round down.
    monkeypatch.setattr(tensors, "loaded_torch", Counting)
    for bf16 in (False, True):
        dest = np.empty(x64.shape, np.uint16 if bf16 else np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            tensors.cast_into(dest, x64, bfloat16=bf16)
            _same(dest, tensors._bf16_bits(x64) if bf16 else x64.astype(np.float16))
    monkeypatch.undo()
    small = x32[:100]
    monkeypatch.setattr(tensors, "loaded_torch", Counting)
    with np.errstate(over="ignore"):
        tensors.cast_into(np.empty(small.shape, np.float16), small)
    assert Counting.calls == 2 * (2 * len(sources) + 1)  # below _TORCH_MIN_ELEMENTS: numpy's cast
    monkeypatch.undo()
    assert tensors.loaded_torch() is torch  # and it is the one taken in a process with torch
    bits = np.empty(x32.shape, np.uint16)
    tensors.cast_into(bits, x32, bfloat16=True)
    _same(bits, torch.from_numpy(x32).bfloat16().view(torch.int16).numpy().view(np.uint16))
