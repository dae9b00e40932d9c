"""Weights packed for sync straight from the learner's parameters: gathered and cast one tensor at a time.

`GatheredWeights` is the `named` a learner hands to `WeightTransport.publish`: its parameters
(sharded DTensors under FSDP2, plain tensors otherwise), each shared tensor once (a tied
embedding and LM head are one parameter: the receiver's model ties them again), and the dtype
the rollout engines hold (`models.dtype`). Packing goes bucket by bucket and, inside a bucket,
tensor by tensor: a sharded parameter is gathered (`full_tensor()`, a collective every rank
enters), cast, copied into the bucket and dropped, so beyond the snapshot's own buckets no
rank ever holds more than one gathered tensor. The manifest is planned from shapes alone.

The other ranks call `gather_only()` when rank 0 starts a pack (`before_gather` tells them):
the same `full_tensor()` calls in the same order, results discarded.

It knows tensors, DTensors and the manifest; it knows nothing of models, optimizers or groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import overload

import torch
from torch import Tensor

from asyncopd.weightsync.manifest import Manifest, ManifestError, check_tensors, copy_into, new_bucket


def _full(tensor: Tensor) -> Tensor:
    full = getattr(tensor, "full_tensor", None)  # a DTensor: gather its shards (a collective)
    return full() if full is not None else tensor


class GatheredWeights(Sequence[tuple[str, Tensor]]):
    """Named weights (each tensor once) to be gathered and cast to `dtype` while they are packed."""

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        dtype: torch.dtype | None = None,
        before_gather: Callable[[], None] | None = None,
    ) -> None:
        seen: set[int] = set()
        self.named: list[tuple[str, Tensor]] = []
        for name, tensor in named:
            if id(tensor) in seen:  # tied weights: the first name carries them
                continue
            seen.add(id(tensor))
            self.named.append((name, tensor))
        self.dtype = dtype
        self.before_gather = before_gather

    def _target(self, tensor: Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def specs(self) -> list[tuple[str, Tensor]]:
        """Meta tensors of each weight's full shape and sync dtype (for `manifest.plan`)."""
        return [(n, torch.empty(t.shape, dtype=self._target(t), device="meta")) for n, t in self.named]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def check(self, manifest: Manifest) -> None:
        """Raise `ManifestError` unless `manifest` lays out exactly these weights (names, full
        shapes, sync dtypes), checked before any gather."""
        check_tensors(self.specs(), manifest)

    def pack(self, manifest: Manifest, device: torch.device | str) -> list[Tensor]:
        """The buckets of `manifest`, filled bucket by bucket with each tensor gathered, cast and dropped."""
        return list(self.pack_buckets(manifest, device))

    def pack_buckets(self, manifest: Manifest, device: torch.device | str) -> Iterator[Tensor]:
        """`pack` one bucket at a time, in order: each is yielded once filled (its tensors gathered
        just before; followers gather in the same order). Checked against `manifest` here, when
        called; the gather starts at the first bucket."""
        self.check(manifest)
        return self._gather_buckets(manifest, device)

    def _gather_buckets(self, manifest: Manifest, device: torch.device | str) -> Iterator[Tensor]:
        if self.before_gather is not None:
            self.before_gather()
        specs = list(zip(self.named, manifest.tensors, strict=True))
        for index in range(len(manifest.bucket_sizes)):
            with torch.no_grad():
                bucket = new_bucket(manifest, index, device)
                for (name, tensor), spec in specs:
                    if spec.bucket != index:
                        continue
                    full = _full(tensor.detach()).to(self._target(tensor)).contiguous()
                    if tuple(full.shape) != spec.shape:
                        raise ManifestError(f"tensor {name!r} {tuple(full.shape)} does not match manifest entry {spec}")
                    copy_into(bucket, spec, full)
                    del full
            yield bucket

    @torch.no_grad()
    def gather_only(self) -> None:
        """A follower's part of `pack`: every sharded tensor's gather, in packing order (`plan` keeps
        this list's order), discarded."""
        for _name, tensor in self.named:
            _full(tensor.detach())

    # Sequence: gathered one tensor at a time (the transport packs through `pack` instead).
    def __len__(self) -> int:
        return len(self.named)

    @overload
    def __getitem__(self, index: int) -> tuple[str, Tensor]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, Tensor]]: ...
    def __getitem__(self, index: int | slice) -> tuple[str, Tensor] | list[tuple[str, Tensor]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        name, tensor = self.named[index]
        return name, _full(tensor.detach()).to(self._target(tensor))

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return (self[i] for i in range(len(self)))
