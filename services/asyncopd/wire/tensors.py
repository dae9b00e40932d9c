"""Tensor codec: numpy/torch arrays <-> `asyncopd.v1.Tensor` (dtype, shape, raw LE bytes).

Decoding is zero-copy where the dtype allows (a read-only numpy view or `torch.frombuffer`
over the message's bytes). numpy has no bfloat16, so bfloat16 decodes to float32 with numpy
(one cheap widening) and zero-copy with torch. Every decode checks the dtype, the shape and
the byte count before touching the data.

torch is imported only when a torch tensor is encoded or decoded, so a
process that handles numpy only (the cache service) starts without loading it.

Half-precision casts of numpy arrays (`cast_into`, `to_float32`: payload frames, log-prob
checks) go through torch when the process has loaded it (every producer and reader does): numpy
converts float16 one element at a time, ~25x slower than torch's vectorised kernels on a
top-64 x 4k-token tensor, for the same bits (both round to nearest even).
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from asyncopd.v1 import common_pb2 as pb
from asyncopd.wire.errors import WireError

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("asyncopd's tensor codec assumes a little-endian host")

# wire dtype -> (numpy dtype or None for bfloat16, torch dtype name, bytes per element)
_DTYPES: dict[int, tuple[np.dtype[Any] | None, str, int]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), "float32", 4),
    pb.DTYPE_FLOAT16: (np.dtype("<f2"), "float16", 2),
    pb.DTYPE_BFLOAT16: (None, "bfloat16", 2),
    pb.DTYPE_FLOAT64: (np.dtype("<f8"), "float64", 8),
    pb.DTYPE_INT8: (np.dtype("i1"), "int8", 1),
    pb.DTYPE_INT16: (np.dtype("<i2"), "int16", 2),
    pb.DTYPE_INT32: (np.dtype("<i4"), "int32", 4),
    pb.DTYPE_INT64: (np.dtype("<i8"), "int64", 8),
    pb.DTYPE_UINT8: (np.dtype("u1"), "uint8", 1),
    pb.DTYPE_BOOL: (np.dtype("?"), "bool", 1),
}
_FROM_NUMPY = {np_dt.str: code for code, (np_dt, _, _) in _DTYPES.items() if np_dt is not None}


@functools.cache
def _torch_dtypes() -> tuple[dict[int, torch.dtype], dict[torch.dtype, int]]:
    """(wire code -> torch dtype, torch dtype -> wire code); imports torch on first use."""
    import torch

    to_torch = {code: getattr(torch, name) for code, (_, name, _) in _DTYPES.items()}
    return to_torch, {t_dt: code for code, t_dt in to_torch.items()}


def loaded_torch() -> Any | None:
    """The torch module when this process has imported it, else None (nothing is imported here)."""
    torch_module = sys.modules.get("torch")
    return torch_module if hasattr(torch_module, "from_numpy") else None  # not a half-done import


# torch.from_numpy warns once per process that a read-only array (a frame's bytes) could be
# written through; the casts below only read their sources.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    bits = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the 16 bits become the high half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# Sources torch casts to the same bits as numpy: not float64, which torch narrows to float16
# through float32 (rounding twice), where numpy rounds once.
_TORCH_CASTS = (np.dtype(np.float16), np.dtype(np.float32))
# Below this many elements numpy's cast is as fast as torch's call overhead (~3 us), and a
# torch op releases the GIL: in a process of many threads each release is a hand-over.
_TORCH_MIN_ELEMENTS = 4096


def cast_into(dest: np.ndarray, src: np.ndarray, bfloat16: bool = False) -> None:
    """`dest[...] = src`, cast to dest's dtype; `bfloat16`: dest is uint16 holding bfloat16 bits.
    Through torch when it is loaded (same bits), else numpy."""
    torch_module = loaded_torch()
    half = bfloat16 or np.float16 in (dest.dtype, src.dtype)
    if (
        half
        and src.size >= _TORCH_MIN_ELEMENTS
        and torch_module is not None
        and src.dtype in _TORCH_CASTS
        and dest.shape == src.shape
        and min(src.strides, default=0) >= 0  # torch.from_numpy takes no negative strides
    ):
        out = torch_module.from_numpy(dest.view(np.int16) if bfloat16 else dest)
        out = out.view(torch_module.bfloat16) if bfloat16 else out
        out.copy_(torch_module.from_numpy(src))
    elif bfloat16:
        dest[...] = _bf16_bits(src)
    else:
        np.copyto(dest, src, casting="unsafe")


def to_float32(a: np.ndarray) -> np.ndarray:
    """`a` as float32: `a` itself when it is float32 already, else a cast copy (see `cast_into`)."""
    if a.dtype == np.float32:
        return a
    out = np.empty(a.shape, np.float32)
    cast_into(out, a)
    return out


def _is_torch_tensor(array: object) -> TypeGuard[torch.Tensor]:
    # An object can only be a torch tensor if torch has been imported by someone.
    torch_module = loaded_torch()
    return torch_module is not None and isinstance(array, torch_module.Tensor)


# names accepted by `encode(..., dtype=...)`
DTYPE_NAMES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float64": pb.DTYPE_FLOAT64,
    "int8": pb.DTYPE_INT8,
    "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "uint8": pb.DTYPE_UINT8,
    "bool": pb.DTYPE_BOOL,
}

MAX_DIMS = 8


def dtype_name(code: int) -> str:
    for name, c in DTYPE_NAMES.items():
        if c == code:
            return name
    return f"<unknown dtype {code}>"


def encode(array: np.ndarray | torch.Tensor, dtype: str | None = None) -> pb.Tensor:
    """Encode an array as a wire Tensor, optionally casting to `dtype` (e.g. "float16")."""
    if _is_torch_tensor(array):
        import torch

        to_torch, from_torch = _torch_dtypes()
        t = array.detach().to("cpu")
        if dtype is not None:
            t = t.to(to_torch[DTYPE_NAMES[dtype]])
        code = from_torch.get(t.dtype)
        if code is None:
            raise WireError(f"tensor dtype {t.dtype} has no wire encoding")
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return pb.Tensor(dtype=code, shape=list(t.shape), data=raw)  # type: ignore[arg-type]
    a = np.asarray(array)
    if dtype == "bfloat16":
        src = np.require(a, dtype=np.float32, requirements="C")
        bits = np.empty(src.shape, np.uint16)
        cast_into(bits, src, bfloat16=True)  # through torch where it is loaded, as in payload frames
        return pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=list(src.shape), data=bits.tobytes())  # type: ignore[arg-type]
    if dtype is not None:
        np_dt = _DTYPES[DTYPE_NAMES[dtype]][0]
        assert np_dt is not None
        if a.dtype != np_dt:
            cast = np.empty(a.shape, np_dt)
            cast_into(cast, a)  # float16: through torch where it is loaded, as in payload frames
            a = cast
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
    a = np.require(a.astype(a.dtype.newbyteorder("<"), copy=False), requirements="C")
    code = _FROM_NUMPY.get(a.dtype.str)
    if code is None:
        raise WireError(f"array dtype {a.dtype} has no wire encoding")
    return pb.Tensor(dtype=code, shape=list(a.shape), data=a.tobytes())  # type: ignore[arg-type]


def _check(msg: pb.Tensor, field: str, max_elements: int | None) -> tuple[int, tuple[int, ...]]:
    if msg.dtype not in _DTYPES:
        raise WireError(f"{field}: dtype {msg.dtype} ({dtype_name(msg.dtype)}) is not a valid tensor dtype")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_DIMS:
        raise WireError(f"{field}: {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in shape):
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    if max_elements is not None and numel > max_elements:
        raise WireError(f"{field}: {numel} elements exceed the limit of {max_elements}")
    itemsize = _DTYPES[msg.dtype][2]
    if len(msg.data) != numel * itemsize:
        raise WireError(
            f"{field}: {len(msg.data)} data bytes, but shape {list(shape)} of "
            f"{dtype_name(msg.dtype)} needs {numel * itemsize}"
        )
    return numel, shape


def decode_numpy(msg: pb.Tensor, field: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """Decode to numpy: a read-only zero-copy view (bfloat16: a float32 copy)."""
    _, shape = _check(msg, field, max_elements)
    np_dt = _DTYPES[msg.dtype][0]
    if np_dt is None:  # bfloat16: widened to float32
        return bf16_to_float32(np.frombuffer(msg.data, dtype="<u2")).reshape(shape)
    return np.frombuffer(msg.data, dtype=np_dt).reshape(shape)


def decode_torch(msg: pb.Tensor, field: str = "tensor", max_elements: int | None = None) -> torch.Tensor:
    """Decode to a CPU torch tensor sharing the message's bytes (treat it as read-only)."""
    import torch

    numel, shape = _check(msg, field, max_elements)
    t_dt = _torch_dtypes()[0][msg.dtype]
    if numel == 0:
        return torch.empty(shape, dtype=t_dt)
    # frombuffer warns on read-only buffers; the tensor is never written through.
    buf = memoryview(msg.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=t_dt).reshape(shape)
