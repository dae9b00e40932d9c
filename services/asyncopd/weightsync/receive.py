"""A replica's receive side of one update: two persistent bucket buffers and the stream through them.

`ReceiveBuffers` holds two flat uint8 buffers of the largest bucket announced so far, allocated
once and reused for every bucket of every update (and across membership epochs): a replica's
extra memory for weight sync is two buckets, never a copy of the model. They grow only when a
manifest announces a larger bucket than any before (a tensor larger than `weightsync.bucket_mb`
gets a bucket of its own).

`WeightStream` is what `apply` (the engine's `load_weights`) gets: an iterable of
`(name, tensor)` that receives bucket k + 2 into the buffer of bucket k while the engine loads
bucket k + 1, so the transfer and the load overlap and at most two buckets are in flight or
held. A yielded tensor is a view into a receive buffer: it is valid until the engine asks for
the first tensor of the bucket after next, so the engine must copy it (every `load_weights`
does), not keep it. The stream is single-pass. With per-bucket checksums every bucket is
verified before any of its tensors is handed on.

With delta sync (`weightsync.delta`) a replica also keeps `BaseBuckets`: the decoded buckets of
the version it applied last (one copy of the model, allocated once per layout). Each bucket's
payload — a delta or the dense bytes — is received into a receive buffer as before and decoded
over its base bucket in place (`asyncopd.weightsync.delta.decode_into`); the stream then yields
views into the base bucket (valid until the next update) and verifies the decoded bytes against
the bucket's checksum. A base bucket is overwritten as it is decoded, so the base holds no
version (`version` -1) from the first decode until the update completed.

It knows buffers, the manifest and a receive/wait pair of callables; it knows nothing of
stores, registrations or engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from asyncopd.weightsync.delta import Encoding, decode_into
from asyncopd.weightsync.manifest import Manifest, ManifestError, checksum, view


class Abandoned(RuntimeError):
    """The broadcast of an update was abandoned (a rebuild was announced, or the replica stops)."""


class Incomplete(RuntimeError):
    """The stream ended before every bucket arrived (its failure was raised inside `apply`)."""


class ReceiveBuffers:
    """Two reusable receive buffers on one device."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._slots: list[torch.Tensor] = []
        self._views: tuple[Manifest, list[list[tuple[str, torch.Tensor]]]] | None = None
        self.allocations = 0  # buffers allocated over this object's life (2 per growth)
        self.allocated_bytes = 0  # bytes of those allocations

    @property
    def capacity(self) -> int:
        """Bytes of each buffer (0 before the first update)."""
        return int(self._slots[0].numel()) if self._slots else 0

    @property
    def nbytes(self) -> int:
        """Bytes held now (both buffers)."""
        return 2 * self.capacity

    def reserve(self, nbytes: int) -> None:
        """Make both buffers hold at least `nbytes` (reallocated only when they are smaller)."""
        if nbytes <= self.capacity:
            return
        self._slots, self._views = [], None  # free the old pair before allocating the new one
        self._slots = [self._allocate(nbytes) for _ in range(2)]

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        self.allocated_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def views(self, manifest: Manifest) -> list[list[tuple[str, torch.Tensor]]]:
        """Per bucket, `(name, view)` of its tensors in the buffer it arrives in; kept for the
        last manifest (updates of one model repeat it, so no view is built on the hot path)."""
        if self._views is None or self._views[0] is not manifest:
            per_bucket: list[list[tuple[str, torch.Tensor]]] = [[] for _ in manifest.bucket_sizes]
            for spec in manifest.tensors:
                bucket = self.slot(spec.bucket, manifest.bucket_sizes[spec.bucket])
                per_bucket[spec.bucket].append((spec.name, view(bucket, spec)))
            self._views = (manifest, per_bucket)
        return self._views[1]

    def slot(self, bucket: int, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the buffer that bucket number `bucket` is received into."""
        return self._slots[bucket % 2][:nbytes]


class BaseBuckets:
    """The buckets of the last version a replica applied, which the next delta is decoded over."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.version = -1  # the version the buckets hold; -1: none (never filled, or mid-update)
        self.manifest: Manifest | None = None
        self._buckets: list[torch.Tensor] = []
        self._views: list[list[tuple[str, torch.Tensor]]] = []
        self.allocations = 0  # layouts allocated over this object's life

    @property
    def nbytes(self) -> int:
        return sum(int(b.numel()) for b in self._buckets)

    def holds(self, version: int, manifest: Manifest) -> bool:
        """Whether the buckets are exactly `version` in the layout `manifest` (a delta against it decodes)."""
        return version >= 0 and self.version == version and self.manifest is manifest

    def begin(self, manifest: Manifest) -> None:
        """Start decoding an update of `manifest` over the buckets (allocated for a new layout): they
        hold no version until `finish`."""
        self.version = -1
        if self.manifest is not manifest:
            self._buckets, self._views = [], []  # free the old layout before allocating the new one
            self._buckets = [torch.zeros(size, dtype=torch.uint8, device=self.device) for size in manifest.bucket_sizes]
            self._views = [[] for _ in manifest.bucket_sizes]
            for spec in manifest.tensors:
                self._views[spec.bucket].append((spec.name, view(self._buckets[spec.bucket], spec)))
            self.manifest = manifest
            self.allocations += 1

    def land(
        self, bucket: int, payload: torch.Tensor, encoding: Encoding, changed: int
    ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """Decode `payload` over base bucket `bucket`; the decoded bucket and views of its tensors."""
        decoded = decode_into(self._buckets[bucket], encoding, changed, payload)
        return decoded, self._views[bucket]

    def finish(self, version: int) -> None:
        """Every bucket of `version` was decoded."""
        self.version = version


# Decode one received bucket payload (its index, the received bytes) into the bucket and the
# (name, view) list of its tensors; None: the payload is the bucket.
Land = Callable[[int, torch.Tensor], tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]]
Receive = Callable[[torch.Tensor], Any]  # start receiving into a tensor; returns a handle for `Wait`
Wait = Callable[[Any], bool]  # block until a receive completed (True) or was abandoned (False)


class WeightStream:
    """The tensors of one update, yielded as their buckets arrive (see the module doc)."""

    def __init__(
        self,
        manifest: Manifest,
        buffers: ReceiveBuffers,
        receive: Receive,
        wait: Wait,
        digests: Sequence[str] = (),
        *,
        payload_sizes: Sequence[int] | None = None,
        land: Land | None = None,
    ) -> None:
        """`payload_sizes`: the bytes received per bucket when they differ from the buckets' (a delta;
        each at most its bucket's size, 0 receives nothing); `land` decodes them (see `BaseBuckets`).
        `digests` are of the decoded buckets."""
        if digests and len(digests) != len(manifest.bucket_sizes):
            raise ManifestError(f"{len(digests)} bucket checksums for {len(manifest.bucket_sizes)} buckets")
        sizes = list(manifest.bucket_sizes if payload_sizes is None else payload_sizes)
        if len(sizes) != len(manifest.bucket_sizes) or any(
            not 0 <= p <= b for p, b in zip(sizes, manifest.bucket_sizes, strict=True)
        ):
            raise ManifestError(f"payload sizes {sizes} do not fit the buckets {list(manifest.bucket_sizes)}")
        self._sizes = sizes
        self._land = land
        self.manifest = manifest
        self._buffers = buffers
        self._receive = receive
        self._wait = wait
        self._digests = list(digests)
        self.complete = False  # every bucket arrived (and matched its checksum)
        self.failure: BaseException | None = None  # what ended the stream early
        self.received_bytes = 0
        buffers.reserve(max(manifest.bucket_sizes, default=0))
        self._views = buffers.views(manifest)
        self._buckets = self._run()
        self._iter = (item for bucket in self._buckets for item in bucket)

    @property
    def specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order they are yielded; known before any arrives."""
        return [(name, tuple(t.shape)) for bucket in self._views for name, t in bucket]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._iter

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The same tensors one bucket at a time (a bucket's list is valid until the one after next
        is asked for); the same single pass as iterating the stream, not a second one."""
        return self._buckets

    def drain(self) -> None:
        """Receive whatever `apply` did not ask for (the group's broadcasts must all complete)."""
        for _ in self._buckets:
            pass
        if not self.complete:
            raise Incomplete("the update's stream ended early") from self.failure

    def _run(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        sizes = self._sizes
        pending: dict[int, Any] = {}

        def start(k: int) -> None:
            # An empty payload (a bucket that did not change) is not sent: nothing to receive.
            pending[k] = self._receive(self._buffers.slot(k, sizes[k])) if sizes[k] else None

        try:
            for k in range(min(2, len(sizes))):
                start(k)
            for k, size in enumerate(sizes):
                work = pending.pop(k)
                if work is not None and not self._wait(work):
                    raise Abandoned(f"bucket {k} of {len(sizes)} abandoned")
                received = self._buffers.slot(k, size)
                bucket, views = (received, self._views[k]) if self._land is None else self._land(k, received)
                if self._digests and checksum([bucket]) != self._digests[k]:
                    raise ManifestError(f"checksum mismatch in bucket {k} of {len(sizes)}")
                self.received_bytes += size
                yield list(views)
                # The engine asked past bucket k: its buffer takes bucket k + 2.
                if k + 2 < len(sizes):
                    start(k + 2)
        except BaseException as exc:
            self.failure = exc
            raise
        self.complete = True
