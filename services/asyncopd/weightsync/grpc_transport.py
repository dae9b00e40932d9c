"""The gRPC weight transport: RolloutService.PushWeights as a chunk stream, and the `GrpcPush` backend.

For replicas that cannot join a collective (another network, no torch.distributed), the
learner streams each update as `WeightChunk`s of at most `chunk_mb`: a tensor larger than a
chunk travels as slices along its first dimension (offset and numel count elements of the
whole tensor; each slice keeps the trailing shape, from which the receiver rebuilds the
shape; a tensor whose single row exceeds a chunk arrives flat). The last chunk carries
`last=True` and, when checksums are on, a digest over every tensor (name, dtype, bytes).

`GrpcPush` is the `WeightTransport` backend that pushes every snapshot to every registered
replica's RolloutService (one sender thread each, under `timeout_s`; a failed push drops the
replica). A target has no heartbeat: it is live until a push to it fails, so its name is held
until then (see `transport.may_take`); at most `weightsync.max_replicas` targets. It runs
alone (`weightsync.transport: grpc`) or inside the collective backend for the replicas that
registered with `collective=false`. `chunks()`/`push_weights()` are its sender;
`WeightAssembler` is the receiver the RolloutService servicer feeds, which returns the complete
`(version, [(name, tensor), ...])` for the engine's `load_weights` and rejects anything the
receiving model does not hold or that is inconsistent (unknown names, wrong shapes or dtypes,
NaN/Inf, a version outside the window, mixed versions, slices that leave an element unwritten
or write one twice, a checksum mismatch) with `ManifestError` (a ValueError: INVALID_ARGUMENT
through `rpc.status_errors`).

It knows the wire messages; it knows nothing of engines, process groups or the store.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch

from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.v1 import rollout_pb2 as pb
from asyncopd.v1 import rollout_pb2_grpc as pb_grpc
from asyncopd.weightsync.manifest import ManifestError, ParamSpec
from asyncopd.weightsync.transport import (
    NotTheOwner,
    PublishReport,
    Registration,
    Snapshot,
    SyncThread,
    WeightTransport,
    check_room,
    may_take,
)
from asyncopd.wire.rpc import channel
from asyncopd.wire.tensors import decode_torch, encode

log = logging.getLogger(__name__)

_MIB = 1 << 20

# (replica address, snapshot, timeout_s) -> anything; raises when the replica did not take it
PushFn = Callable[[str, Snapshot, float], object]


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Digest over (name, dtype, bytes) of every tensor, in order (shape-agnostic: see slicing)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _encode(tensor: torch.Tensor) -> Any:
    # The codec's torch path cannot byte-view a 0-d tensor wider than a byte; numpy's can
    # (numpy has no bfloat16, and a 0-d bfloat16 parameter does not occur in practice).
    if tensor.dim() == 0 and tensor.dtype != torch.bfloat16:
        return encode(tensor.numpy())
    return encode(tensor)


def chunks(
    version: int, named: Sequence[tuple[str, torch.Tensor]], chunk_mb: float = 4.0, checksum: bool = False
) -> Iterator[pb.WeightChunk]:
    """The WeightChunk stream of one update (host copies are made one tensor at a time)."""
    if not named:
        raise ValueError("a weight update needs at least one tensor")
    limit = max(1, int(chunk_mb * _MIB))
    digest = tensors_checksum(named) if checksum else ""
    for index, (name, tensor) in enumerate(named):
        host = tensor.detach().cpu().contiguous()
        numel = int(host.numel())
        if numel * host.element_size() <= limit:
            pieces = [(0, host)]
        else:
            # Slice along dim 0 so every piece keeps the trailing shape (the receiver rebuilds
            # the full shape from it); a 1-D tensor or one whose single row exceeds the limit
            # travels as flat slices.
            row_elems = int(host[0].numel()) if host.dim() > 1 and host.shape[0] else 1
            if row_elems * host.element_size() > limit:
                row_elems = 1  # a single row exceeds the limit: flat slices (shape not kept)
            rows = host.reshape(-1, row_elems) if row_elems > 1 else host.reshape(-1)
            per_chunk = max(1, limit // (row_elems * host.element_size()))
            pieces = [
                (start * row_elems, rows[start : start + per_chunk]) for start in range(0, rows.shape[0], per_chunk)
            ]
            if row_elems > 1:
                pieces = [(offset, piece.reshape(-1, *host.shape[1:])) for offset, piece in pieces]
        for n, (offset, piece) in enumerate(pieces):
            last = index == len(named) - 1 and n == len(pieces) - 1
            yield pb.WeightChunk(
                version=version,
                name=name,
                tensor=_encode(piece),
                offset=offset,
                numel=numel if len(pieces) > 1 else 0,
                last=last,
                checksum=digest if last else "",
            )


def push_weights(
    address: str,
    snapshot: Snapshot,
    timeout_s: float,
    *,
    tls: TLSConfig | None = None,
    chunk_mb: float = 4.0,
    max_message_mb: int = 64,
) -> int:
    """Stream `snapshot` to the RolloutService at `address`; returns the version it acknowledged."""
    named = snapshot.manifest.unpack([b.cpu() for b in snapshot.buckets])
    with channel(address, max_message_mb, tls) as chan:
        stub = pb_grpc.RolloutServiceStub(chan)
        reply = stub.PushWeights(chunks(snapshot.version, named, chunk_mb, bool(snapshot.digest)), timeout=timeout_s)
    if reply.version != snapshot.version:
        raise ManifestError(f"replica at {address} acknowledged version {reply.version}, sent {snapshot.version}")
    return int(reply.version)


class WeightAssembler:
    """Receiver side: feed it every chunk of one PushWeights stream, then call `finish()`.

    Everything is checked before it can reach the engine, and nothing is allocated that the
    receiving model does not hold: every chunk names one of `model`'s parameters with its shape
    (a sliced one announces exactly its element count) and dtype, its values are finite, and
    `version` lies in `[current, newest]` (checked on the first chunk, before any tensor is
    read). `finish()` then refuses a tensor whose slices leave any element unwritten or write
    one twice, and a checksum mismatch. Every refusal is a `ManifestError` naming the chunk
    and field (INVALID_ARGUMENT through `rpc.status_errors`).
    """

    def __init__(self, model: Mapping[str, ParamSpec], *, current: int, newest: int) -> None:
        """`model`: what the receiver holds; `current`: the version it holds; `newest`: the
        highest version it accepts (see `RolloutServicer`: its newest known version + 1)."""
        self.model = model
        self.current, self.newest = current, newest
        self.version: int | None = None
        self._chunks = 0
        self._order: list[str] = []
        self._whole: dict[str, torch.Tensor] = {}
        self._sliced: dict[str, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        self._written: dict[str, int] = {}  # elements written so far per sliced tensor
        self._checksum = ""
        self._done = False

    def add(self, chunk: pb.WeightChunk) -> None:
        i = self._chunks
        self._chunks += 1
        if self._done:
            raise ManifestError(f"chunks[{i}]: sent after the chunk marked last")
        if self.version is None:
            self._check_version(int(chunk.version))
            self.version = int(chunk.version)
        elif chunk.version != self.version:
            raise ManifestError(f"chunks[{i}].version: {chunk.version} inside an update of version {self.version}")
        name = chunk.name
        if not name:
            raise ManifestError(f"chunks[{i}].name: must not be empty")
        spec = self.model.get(name)
        if spec is None:
            raise ManifestError(f"chunks[{i}].name: unknown parameter {name!r}")
        piece = decode_torch(chunk.tensor, f"chunks[{i}].tensor")
        if not spec.admits(piece.dtype):
            want = spec.dtype or "a floating-point dtype"
            raise ManifestError(f"chunks[{i}].tensor: dtype {piece.dtype} for {name}, which needs {want}")
        if piece.is_floating_point():
            bad = int((~torch.isfinite(piece)).sum())
            if bad:
                raise ManifestError(f"chunks[{i}].tensor: {bad} NaN/Inf values in {name}")
        if chunk.numel == 0:
            self._add_whole(i, name, spec, piece)
        else:
            self._add_slice(i, chunk, spec, piece)
        if chunk.last:
            self._done = True
            self._checksum = chunk.checksum

    def _check_version(self, version: int) -> None:
        if version < self.current:
            raise ManifestError(f"version: {version} is older than the version this replica holds ({self.current})")
        if version > self.newest:
            raise ManifestError(
                f"version: {version} is ahead of the newest this replica accepts ({self.newest}: one past the "
                "newest version it knows of); the learner publishes versions one at a time"
            )

    def _add_whole(self, i: int, name: str, spec: ParamSpec, piece: torch.Tensor) -> None:
        if name in self._whole or name in self._sliced:
            raise ManifestError(f"chunks[{i}]: tensor {name!r} sent twice")
        if tuple(piece.shape) != spec.shape:
            raise ManifestError(f"chunks[{i}].tensor: shape {tuple(piece.shape)}, but {name} has shape {spec.shape}")
        self._order.append(name)
        self._whole[name] = piece.clone()

    def _add_slice(self, i: int, chunk: pb.WeightChunk, spec: ParamSpec, piece: torch.Tensor) -> None:
        name = chunk.name
        if name in self._whole:
            raise ManifestError(f"chunks[{i}]: tensor {name!r} sent whole and in slices")
        # Checked before allocating: a hostile numel (negative, or petabytes) is never handed to
        # the allocator; only the model's own element count is.
        if chunk.numel != spec.numel:
            raise ManifestError(f"chunks[{i}].numel: {chunk.numel}, but {name} has {spec.numel} elements")
        # A slice keeps the trailing shape (cut along dim 0) or travels flat (see `chunks`).
        if piece.dim() > 1 and tuple(piece.shape[1:]) != spec.shape[1:]:
            raise ManifestError(
                f"chunks[{i}].tensor: slice shape {tuple(piece.shape)} does not fit {name} of shape {spec.shape}"
            )
        if name not in self._sliced:
            self._order.append(name)
            self._sliced[name] = (torch.empty(spec.numel, dtype=piece.dtype), [])
            self._written[name] = 0
        flat, spans = self._sliced[name]
        if piece.dtype != flat.dtype:
            raise ManifestError(f"chunks[{i}].tensor: dtype {piece.dtype}, earlier slices of {name} are {flat.dtype}")
        start, stop = int(chunk.offset), int(chunk.offset) + int(piece.numel())
        if start < 0 or stop > flat.numel():
            raise ManifestError(f"chunks[{i}]: slice [{start}, {stop}) outside {name} ({flat.numel()} elements)")
        self._written[name] += stop - start
        if self._written[name] > flat.numel():
            raise ManifestError(f"chunks[{i}]: slices of {name} write more than its {flat.numel()} elements")
        flat[start:stop] = piece.reshape(-1)
        spans.append((start, stop))

    def finish(self) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """The complete update; raises if the stream ended early, a sliced tensor has slots left
        unwritten or written twice, or the checksum fails."""
        if self.version is None:
            raise ManifestError("chunks: empty update")
        if not self._done:
            raise ManifestError("chunks: the stream ended without a chunk marked last")
        named: list[tuple[str, torch.Tensor]] = []
        for name in self._order:
            if name in self._whole:
                named.append((name, self._whole[name]))
                continue
            flat, spans = self._sliced[name]
            covered = 0
            for start, stop in sorted(spans):
                if start != covered:
                    what = "written twice" if start < covered else "never written"
                    raise ManifestError(
                        f"chunks: slices of {name} leave element {min(start, covered)} {what} "
                        f"(every element of a tensor must arrive exactly once)"
                    )
                covered = stop
            if covered != flat.numel():
                raise ManifestError(
                    f"chunks: slices of {name} cover {covered} of its {flat.numel()} elements; the rest would be "
                    "uninitialised memory"
                )
            named.append((name, flat.view(self.model[name].shape)))
        if self._checksum and tensors_checksum(named) != self._checksum:
            raise ManifestError(f"checksum mismatch in weight update version {self.version}")
        return self.version, named


@dataclass
class _Target:
    replica: str
    registration: int
    address: str
    owner: str = ""  # who registered it (asyncopd.wire.authz.Caller.owner; "" = in-process)
    pushed_version: int = -1  # last version it took


class GrpcPush(WeightTransport):
    """Push every snapshot to each registered replica's RolloutService; no group, no store."""

    def __init__(
        self,
        config: WeightSyncConfig,
        *,
        push: PushFn | None = None,
        ids: Iterator[int] | None = None,
        maintenance_interval_s: float = 0.2,
    ) -> None:
        """`push` defaults to `push_weights` without TLS; `ids` hands out registration ids (shared
        with the collective backend when this serves its `collective=false` replicas)."""
        self.config = config
        self.timeout_s = config.timeout_s
        self._push: PushFn = push or (
            lambda address, snapshot, timeout_s: push_weights(
                address, snapshot, timeout_s, chunk_mb=config.grpc_chunk_mb
            )
        )
        self._ids = ids if ids is not None else itertools.count(1)
        self._targets: dict[str, _Target] = {}
        self._lock = threading.Lock()  # registration never waits behind a push
        self._sync_lock = threading.RLock()  # one push round at a time, in version order
        self._latest: Snapshot | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="weightsync-push")
        self._maintenance = SyncThread("weightsync-push-maintenance", self._behind, self.sync, maintenance_interval_s)
        self._maintenance.start()

    def register(
        self, replica: str, device: str = "cpu", address: str = "", collective: bool = True, owner: str = ""
    ) -> Registration:
        if not replica:
            raise ValueError("replica name must be non-empty")
        if collective:
            raise ValueError(
                f"replica {replica!r}: this learner pushes weights over gRPC (weightsync.transport=grpc); "
                "register with collective=false and the replica's RolloutService address"
            )
        if not address:
            raise ValueError(f"replica {replica!r}: collective=false needs its RolloutService address for PushWeights")
        with self._lock:
            held = self._targets.get(replica)
            if held is not None:
                may_take(replica, held.owner, owner, live=True)
            else:
                check_room(len(self._targets), self.config.max_replicas, replica)
            target = _Target(replica, next(self._ids), address, owner)
            self._targets[replica] = target
            world = 1 + len(self._targets)
        self._maintenance.wake()
        return Registration(
            store_host="",
            store_port=0,
            registration=target.registration,
            membership_epoch=0,
            world_size=world,
            version=self.latest_version,
            backend="grpc",
            timeout_s=self.timeout_s,
        )

    def unregister(self, replica: str, registration: int = 0, owner: str = "") -> bool:
        with self._lock:
            target = self._targets.get(replica)
            if target is None or (registration and target.registration != registration):
                return False
            if target.owner != owner:
                raise NotTheOwner(f"replica {replica!r} was registered by another caller; only it may unregister")
            del self._targets[replica]
        return True

    def release(self, replica: str, owner: str = "") -> bool:
        """Give up `replica`'s target for a registration of the other kind by `owner` (`may_take`
        decides); False when it has none here."""
        with self._lock:
            held = self._targets.get(replica)
            if held is None:
                return False
            may_take(replica, held.owner, owner, live=True)
            del self._targets[replica]
        return True

    def __contains__(self, replica: str) -> bool:
        with self._lock:
            return replica in self._targets

    @property
    def replicas(self) -> list[str]:
        with self._lock:
            return sorted(self._targets)

    @property
    def latest_version(self) -> int:
        return self._latest.version if self._latest is not None else -1

    def publish(self, version: int, named: Sequence[tuple[str, torch.Tensor]]) -> PublishReport:
        start = time.perf_counter()
        snapshot = Snapshot.take(version, named, self._latest, self.config, torch.device("cpu"))
        packed = time.perf_counter()
        self.deliver(snapshot)
        end = time.perf_counter()
        return PublishReport(
            version=version,
            replicas=len(self.replicas),
            nbytes=snapshot.nbytes,
            pack_seconds=packed - start,
            sync_seconds=end - packed,
            rebuilds=0,
            seconds=end - start,
        )

    def sync(self) -> None:
        latest = self._latest
        if latest is not None:
            self.deliver(latest)

    def deliver(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the latest (unless a newer one is) and push it to every replica behind it."""
        with self._sync_lock:
            if self._latest is None or snapshot.version > self._latest.version:
                self._latest = snapshot
            snapshot = self._latest
            with self._lock:
                targets = [t for t in self._targets.values() if t.pushed_version < snapshot.version]
            if not targets:
                return
            snapshot.complete()  # packed here, not in the pushing threads (a pack may gather)
            jobs = {self._pool.submit(self._push, t.address, snapshot, self.timeout_s): t for t in targets}
            failed: list[_Target] = []
            for job, target in jobs.items():
                try:
                    job.result(timeout=self.timeout_s + 1)
                    target.pushed_version = snapshot.version
                except Exception as exc:
                    log.warning("PushWeights to %s (%s) failed: %s", target.replica, target.address, exc)
                    failed.append(target)
            with self._lock:
                for target in failed:
                    if self._targets.get(target.replica) is target:
                        del self._targets[target.replica]
            for target in failed:
                log.warning("replica %s dropped from weight sync: gRPC PushWeights failed", target.replica)

    def close(self) -> None:
        self._maintenance.stop(self.timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _behind(self) -> bool:
        latest = self._latest
        if latest is None:
            return False
        with self._lock:
            return any(t.pushed_version < latest.version for t in self._targets.values())
