"""What one weight update holds and how it is laid out in broadcast buckets.

A `Manifest` lists every tensor (name, dtype, shape) and where its bytes sit in which bucket.
Buckets are flat uint8 tensors of at most `bucket_bytes` (a tensor larger than that gets a
bucket of its own), so any dtype travels bit-exact and the receiver can rebuild views of the
right dtype without a copy. The manifest travels as JSON through the rendezvous store; the
buckets travel through the collective (or as gRPC chunks).

A receiver allocates what a manifest announces, and the store it comes through is writable by
every replica, so nothing is allocated before the manifest is checked: `validate` refuses
overlapping tensors and buckets larger than the tensors packed in them, and `check_fits`
refuses any tensor the receiving model does not hold under that name and shape (`ParamSpec`) —
together they cap an update at the model's own size.

This module knows tensors and bytes; it knows nothing of process groups, stores or gRPC.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Offsets inside a bucket are aligned so every dtype view of a slice is legal (and fast).
_ALIGN = 16

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}


class ManifestError(ValueError):
    """An update whose tensors, shapes or bytes do not match what was announced."""


@dataclass(frozen=True)
class ParamSpec:
    """What a receiving model holds under one name: its shape and, when known, its dtype name
    (None: any floating-point dtype; engines cast an update to their own dtype on load)."""

    shape: tuple[int, ...]
    dtype: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ParamSpec:
        """The spec of a tensor held by a receiver: its shape and its exact dtype."""
        name = _NAMES.get(tensor.dtype)
        if name is None:
            raise ManifestError(f"dtype {tensor.dtype} cannot travel through weight sync")
        return cls(tuple(tensor.shape), name)

    def admits(self, dtype: torch.dtype) -> bool:
        if self.dtype is None:
            return dtype.is_floating_point
        return _NAMES.get(dtype) == self.dtype


def param_specs(shapes: Mapping[str, Sequence[int]]) -> dict[str, ParamSpec]:
    """The specs of a model whose parameters are known by shape only (an engine's `param_shapes()`)."""
    return {name: ParamSpec(tuple(int(d) for d in shape)) for name, shape in shapes.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an update: its name, dtype, shape and place in the buckets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Manifest:
    """The layout of one update: tensor specs plus the byte size of every bucket."""

    tensors: tuple[TensorSpec, ...]
    bucket_sizes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_sizes)

    @functools.cached_property
    def gaps(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per bucket, the byte ranges [start, end) no tensor covers (alignment padding)."""
        out: list[list[tuple[int, int]]] = [[] for _ in self.bucket_sizes]
        ends = [0] * len(self.bucket_sizes)
        for t in sorted(self.tensors, key=lambda t: (t.bucket, t.offset)):
            if t.offset > ends[t.bucket]:
                out[t.bucket].append((ends[t.bucket], t.offset))
            ends[t.bucket] = max(ends[t.bucket], t.offset + t.nbytes)
        for k, size in enumerate(self.bucket_sizes):
            if size > ends[k]:
                out[k].append((ends[k], size))
        return tuple(tuple(g) for g in out)

    @functools.cached_property
    def json_text(self) -> str:
        """`to_json()`, computed once (a snapshot's manifest is announced with every update)."""
        return self.to_json()

    def to_json(self) -> str:
        return json.dumps(
            {
                "tensors": [[t.name, t.dtype, list(t.shape), t.bucket, t.offset] for t in self.tensors],
                "bucket_sizes": list(self.bucket_sizes),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        specs = tuple(
            TensorSpec(name=str(n), dtype=str(d), shape=tuple(int(x) for x in s), bucket=int(b), offset=int(o))
            for n, d, s, b, o in raw["tensors"]
        )
        manifest = cls(tensors=specs, bucket_sizes=tuple(int(x) for x in raw["bucket_sizes"]))
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Names unique, dtypes known, every tensor inside its bucket, no two tensors sharing bytes,
        and no bucket larger than its tensors packed (so the announced bytes are the tensors' bytes)."""
        seen: set[str] = set()
        packed = [0] * len(self.bucket_sizes)
        for spec in self.tensors:
            if spec.name in seen:
                raise ManifestError(f"tensor {spec.name!r} appears twice in the update")
            seen.add(spec.name)
            if spec.dtype not in _DTYPES:
                raise ManifestError(f"tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
            if any(d < 0 for d in spec.shape):
                raise ManifestError(f"tensor {spec.name!r} has a negative dimension {spec.shape}")
            if not 0 <= spec.bucket < len(self.bucket_sizes):
                raise ManifestError(f"tensor {spec.name!r} names bucket {spec.bucket} of {len(self.bucket_sizes)}")
            if spec.offset % _ALIGN or spec.offset + spec.nbytes > self.bucket_sizes[spec.bucket]:
                raise ManifestError(f"tensor {spec.name!r} does not fit bucket {spec.bucket} at offset {spec.offset}")
            packed[spec.bucket] += _aligned(spec.nbytes)
        for bucket, (size, used) in enumerate(zip(self.bucket_sizes, packed, strict=True)):
            if size < 0 or size > used:
                raise ManifestError(f"bucket {bucket} announces {size} bytes, its tensors take {used}")
        by_place = sorted(self.tensors, key=lambda t: (t.bucket, t.offset, t.nbytes))
        for before, after in itertools.pairwise(by_place):
            if before.bucket == after.bucket and before.offset + before.nbytes > after.offset:
                raise ManifestError(f"tensors {before.name!r} and {after.name!r} overlap in bucket {before.bucket}")

    def check_against(self, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Raise unless the update holds exactly `expected` {name: (dtype, shape)}."""
        got = {t.name: (t.dtype, t.shape) for t in self.tensors}
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        if missing or extra or wrong:
            raise ManifestError(
                f"update does not match the model: missing {missing[:5]}, unexpected {extra[:5]}, "
                f"dtype/shape differs for {[(n, got[n], expected[n]) for n in wrong[:5]]}"
            )

    def check_fits(self, model: Mapping[str, ParamSpec]) -> None:
        """Raise unless every tensor is one `model` holds, with its shape (and dtype, when the spec
        names one; else a floating-point one). Call before `empty_buckets`: with `validate`, this
        caps what the receiver allocates at the size of its own model (one update may carry a
        subset of the parameters)."""
        for t in self.tensors:
            spec = model.get(t.name)
            if spec is None:
                raise ManifestError(f"update names tensor {t.name!r}, which the model does not have")
            if t.shape != spec.shape:
                raise ManifestError(f"tensor {t.name!r} announced with shape {t.shape}, the model's is {spec.shape}")
            if not spec.admits(_DTYPES[t.dtype]):
                want = spec.dtype or "a floating-point dtype"
                raise ManifestError(f"tensor {t.name!r} announced as {t.dtype}, the model needs {want}")

    def empty_buckets(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.empty(size, dtype=torch.uint8, device=device) for size in self.bucket_sizes]

    def unpack(self, buckets: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Views of every tensor into the received buckets (no copy), in manifest order."""
        if [int(b.numel()) for b in buckets] != list(self.bucket_sizes):
            raise ManifestError(
                f"bucket sizes {[int(b.numel()) for b in buckets]} != announced {list(self.bucket_sizes)}"
            )
        return [(spec.name, view(buckets[spec.bucket], spec)) for spec in self.tensors]


def view(bucket: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor `spec` as a view of the received `bucket` (no copy)."""
    return bucket[spec.offset : spec.offset + spec.nbytes].view(_DTYPES[spec.dtype]).view(spec.shape)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Manifest:
    """Assign tensors to buckets in order, starting a new bucket when the next would overflow."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    specs: list[TensorSpec] = []
    sizes: list[int] = []
    fill = 0
    for name, tensor in named:
        dtype = _NAMES.get(tensor.dtype)
        if dtype is None:
            raise ManifestError(f"tensor {name!r} has dtype {tensor.dtype}, which weight sync cannot carry")
        nbytes = tensor.numel() * tensor.element_size()
        if not sizes or (fill > 0 and _aligned(fill) + nbytes > bucket_bytes):
            sizes.append(0)
            fill = 0
        offset = _aligned(fill)
        specs.append(
            TensorSpec(name=name, dtype=dtype, shape=tuple(tensor.shape), bucket=len(sizes) - 1, offset=offset)
        )
        fill = offset + nbytes
        sizes[-1] = _aligned(fill)
    manifest = Manifest(tensors=tuple(specs), bucket_sizes=tuple(sizes))
    manifest.validate()
    return manifest


def new_bucket(manifest: Manifest, index: int, device: torch.device | str) -> torch.Tensor:
    """Bucket `index` of `manifest`, allocated on `device` with only its padding zeroed: every
    other byte is about to be written by a tensor (zeroing it all first was a third of packing's
    time on a CPU, a pass over the whole model for nothing). Deterministic bytes for checksums and
    deltas once packed."""
    bucket = torch.empty(manifest.bucket_sizes[index], dtype=torch.uint8, device=device)
    for start, end in manifest.gaps[index]:
        bucket[start:end].zero_()
    return bucket


def check_tensors(named: Sequence[tuple[str, torch.Tensor]], manifest: Manifest) -> None:
    """Raise `ManifestError` unless `named` are the manifest's tensors, in order, with its shapes
    and dtypes (meta tensors will do: nothing is read)."""
    if len(named) != len(manifest.tensors):
        raise ManifestError(f"{len(named)} tensors given, manifest lists {len(manifest.tensors)}")
    for (name, tensor), spec in zip(named, manifest.tensors, strict=True):
        if name != spec.name or tuple(tensor.shape) != spec.shape or _NAMES.get(tensor.dtype) != spec.dtype:
            raise ManifestError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match manifest entry {spec}"
            )


def copy_into(bucket: torch.Tensor, spec: TensorSpec, tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes at `spec`'s place in `bucket`."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    target = bucket[spec.offset : spec.offset + spec.nbytes]
    if target.device.type == "cpu" and flat.device.type == "cpu":
        # numpy's memcpy is ~10x faster than torch's copy_ for byte views on a busy CPU
        np.copyto(target.numpy(), flat.numpy())
    else:
        target.copy_(flat)


def pack_buckets(
    named: Sequence[tuple[str, torch.Tensor]], manifest: Manifest, device: torch.device | str
) -> Iterator[torch.Tensor]:
    """`pack`, one bucket at a time in order: each is yielded once filled (a sender can put
    bucket k on the wire while k + 1 is packed). The tensors are checked here, when it is called,
    not at the first bucket: a bad layout fails before anything is announced."""
    check_tensors(named, manifest)
    return _fill_buckets(named, manifest, device)


@torch.no_grad()
def _fill_buckets(
    named: Sequence[tuple[str, torch.Tensor]], manifest: Manifest, device: torch.device | str
) -> Iterator[torch.Tensor]:
    by_bucket: list[list[tuple[torch.Tensor, TensorSpec]]] = [[] for _ in manifest.bucket_sizes]
    for (_, tensor), spec in zip(named, manifest.tensors, strict=True):
        by_bucket[spec.bucket].append((tensor, spec))
    for k, items in enumerate(by_bucket):
        bucket = new_bucket(manifest, k, device)
        for tensor, spec in items:
            copy_into(bucket, spec, tensor)
        yield bucket


def pack(
    named: Sequence[tuple[str, torch.Tensor]], manifest: Manifest, device: torch.device | str
) -> list[torch.Tensor]:
    """Copy the tensors into fresh buckets on `device` (a snapshot: later training steps do not leak in)."""
    return list(pack_buckets(named, manifest, device))


def checksum(buckets: Sequence[torch.Tensor]) -> str:
    """Hex digest over the bytes of every bucket (moved to host memory when needed)."""
    digest = hashlib.blake2b(digest_size=16)
    for bucket in buckets:
        digest.update(bucket.detach().cpu().contiguous().numpy().data)
    return digest.hexdigest()
