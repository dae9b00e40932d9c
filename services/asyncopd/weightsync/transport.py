"""The learner's one view of weight sync: the `WeightTransport` interface, and the factory that picks a backend.

Replicas register with a transport (the learner servicer forwards RegisterReplica /
UnregisterReplica), and the training loop publishes every new version through it. Two backends:

- `asyncopd.weightsync.collective.CollectiveBroadcast` (`weightsync.transport: collective`, the
  default): a torch.distributed group per membership epoch (gloo or NCCL), bucketed broadcast,
  acks; replicas that register with `collective=false` get the same snapshots by gRPC push.
- `asyncopd.weightsync.grpc_transport.GrpcPush` (`weightsync.transport: grpc`): every replica
  gets each snapshot streamed to its RolloutService (PushWeights); no process group, no store.

Both keep the latest packed `Snapshot` (one extra copy of the weights), so late joiners are
served without reading parameters the optimizer is changing.

Registrations are bound to whoever made them (`owner`, the caller's certificate identities and
host: `asyncopd.wire.authz.Caller.owner`), under one rule every backend applies (`may_take`): a
name held by a live registration of another owner is refused (`ReplicaNameTaken`, not evicted);
the same owner re-registering replaces its own registration (a restart); a dead one (it stopped
beating, or never began) is replaced by anyone. Only the owner may unregister
(`NotTheOwner`), and at most `weightsync.max_replicas` are registered at once
(`TooManyReplicas`). The errors are the gRPC status kinds of `asyncopd.wire.rpc`, so the
learner's servicer passes them through.

This module knows the shared records, the interface and the registration rule; it knows
nothing of process groups or stores.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync.delta import BucketDelta, encode
from asyncopd.weightsync.gather import GatheredWeights
from asyncopd.weightsync.manifest import Manifest, checksum, pack_buckets, plan
from asyncopd.wire.rpc import FailedPrecondition, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

_MIB = 1 << 20


class ReplicaNameTaken(FailedPrecondition):
    """The name is held by a live registration of another caller."""


class NotTheOwner(PermissionDenied):
    """Only the caller that made a registration may remove it."""


class TooManyReplicas(ResourceExhausted):
    """`weightsync.max_replicas` registrations exist already."""


def may_take(replica: str, held_by: str, owner: str, live: bool) -> None:
    """Raise `ReplicaNameTaken` unless `owner` may register `replica`, held by `held_by` (live or not)."""
    if live and held_by != owner:
        raise ReplicaNameTaken(
            f"replica name {replica!r} is held by a live registration of another caller; a name is released when "
            "its replica unregisters or stops beating (weightsync.dead_after_s): pick another name or wait"
        )


def check_room(registered: int, max_replicas: int, replica: str) -> None:
    """Raise `TooManyReplicas` when a new name would exceed `max_replicas`."""
    if registered >= max_replicas:
        raise TooManyReplicas(
            f"replica {replica!r}: {registered} replicas are registered for weight sync, the most allowed "
            f"(weightsync.max_replicas={max_replicas})"
        )


@dataclass(frozen=True)
class Registration:
    """What a registering replica is told: the store (collective only), its id, the backend and timeouts."""

    store_host: str
    store_port: int
    registration: int
    membership_epoch: int
    world_size: int
    version: int
    backend: str
    timeout_s: float


class Snapshot:
    """One packed update: the version it carries, its layout, its bytes and their digest.

    A snapshot taken `lazy` (only without checksums: a digest needs every byte first) has its
    buckets allocated but packs them on demand, in order: `bucket(k)` packs up to k, so a sender
    puts bucket k on the wire while k + 1 is packed (on a learner the packing is the weights'
    gather). `buckets` packs whatever is left first. Every consumer but the sender of a dense
    broadcast reads `buckets`; the publisher `complete()`s a snapshot before it lets go of it
    (the learner's other ranks are gathering in step with the packing)."""

    def __init__(
        self,
        version: int,
        manifest: Manifest,
        buckets: list[torch.Tensor],
        digest: str,
        bucket_digests: tuple[str, ...] = (),
        *,
        pending: Iterator[torch.Tensor] | None = None,
    ) -> None:
        self.version = version
        self.manifest = manifest
        self.digest = digest  # over the bucket digests ("" when checksums are off)
        self.bucket_digests = bucket_digests  # one per bucket: a receiver checks each before loading it
        self._buckets = buckets  # packed so far (all of them unless `pending`)
        self._pending = pending
        self._failure: BaseException | None = None  # what stopped the packing
        self._lock = threading.Lock()
        self.pack_seconds = 0.0  # time spent packing, however interleaved with sending

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def whole(self) -> bool:
        """Every bucket is packed."""
        return len(self._buckets) == len(self.manifest.bucket_sizes)

    @property
    def failed(self) -> bool:
        """The packing raised (where it was asked for); the snapshot will never be whole."""
        return self._failure is not None

    @property
    def buckets(self) -> list[torch.Tensor]:
        """Every bucket, packed."""
        self.complete()
        return self._buckets

    def bucket(self, k: int) -> torch.Tensor:
        """Bucket k, packed (and every one before it). A packing that failed raised where it
        failed; asking again raises RuntimeError from it."""
        with self._lock:
            if self._failure is not None and len(self._buckets) <= k:
                raise RuntimeError(f"packing version {self.version} failed") from self._failure
            start = time.perf_counter()
            try:
                while len(self._buckets) <= k:
                    assert self._pending is not None
                    self._buckets.append(next(self._pending))
            except BaseException as exc:
                self._pending, self._failure = None, exc
                raise
            finally:
                self.pack_seconds += time.perf_counter() - start
            if self.whole:
                self._pending = None
            return self._buckets[k]

    def complete(self) -> None:
        """Pack every bucket not packed yet."""
        if not self.whole:
            self.bucket(len(self.manifest.bucket_sizes) - 1)

    @classmethod
    def take(
        cls,
        version: int,
        named: Sequence[tuple[str, torch.Tensor]],
        previous: Snapshot | None,
        config: WeightSyncConfig,
        device: torch.device,
        *,
        lazy: bool = False,
    ) -> Snapshot:
        """Copy `named` into buckets on `device` as `version`; versions must move forward.
        `lazy` (honoured without checksums): pack on demand (see the class doc); `named` must
        not change until the snapshot is complete."""
        if previous is not None and version <= previous.version:
            raise ValueError(f"version {version} is not newer than the last published {previous.version}")
        specs: Sequence[tuple[str, torch.Tensor]]
        if isinstance(named, GatheredWeights):  # sharded / cast weights: gathered while packed
            names, specs = named.names, named.specs()
        else:
            names, specs = [n for n, _ in named], named
        if previous is not None and names == [t.name for t in previous.manifest.tensors]:
            manifest = previous.manifest  # the same model: reuse the layout
        else:
            manifest = plan(specs, int(config.bucket_mb * _MIB))
        start = time.perf_counter()
        pending = (
            named.pack_buckets(manifest, device)
            if isinstance(named, GatheredWeights)
            else pack_buckets(named, manifest, device)
        )
        if lazy and not config.checksum:
            return cls(version, manifest, [], "", pending=pending)  # pack_buckets checked the tensors
        buckets = list(pending)
        per_bucket = tuple(checksum([b]) for b in buckets) if config.checksum else ()
        whole = hashlib.blake2b("".join(per_bucket).encode(), digest_size=16).hexdigest() if config.checksum else ""
        snapshot = cls(version, manifest, buckets, whole, per_bucket)
        snapshot.pack_seconds = time.perf_counter() - start
        return snapshot


@dataclass(frozen=True)
class Delta:
    """A snapshot's buckets encoded against the previous snapshot's (`asyncopd.weightsync.delta`)."""

    version: int  # the snapshot it carries
    base_version: int  # the snapshot it applies to: only receivers holding exactly this one may decode it
    buckets: list[BucketDelta]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def announcement(self) -> dict[str, Any]:
        """What the update command says of it: the base version and each bucket's [encoding, changed words]."""
        return {"base": self.base_version, "buckets": [[b.encoding, b.changed] for b in self.buckets]}

    def applies_to(self, held: Sequence[int]) -> bool:
        """Whether a group whose members hold versions `held` may receive it: every one holds
        exactly `base_version` (a member behind, ahead or new gets the dense buckets)."""
        return bool(held) and all(version == self.base_version for version in held)

    @classmethod
    def between(cls, previous: Snapshot | None, snapshot: Snapshot) -> Delta | None:
        """`snapshot` encoded against `previous`; None without one or when the layout changed."""
        if previous is None or previous.manifest is not snapshot.manifest:
            return None
        buckets = [encode(old, new) for old, new in zip(previous.buckets, snapshot.buckets, strict=True)]
        return cls(snapshot.version, previous.version, buckets)


@dataclass(frozen=True)
class PublishReport:
    """What one publish did (for metrics and logs)."""

    version: int
    replicas: int
    nbytes: int
    pack_seconds: float  # spent packing the snapshot (pipelined with the sending when lazy)
    sync_seconds: float  # from the snapshot's layout to every ack (includes pipelined packing)
    rebuilds: int
    seconds: float = 0.0  # the whole publish, wall clock


class WeightTransport(ABC):
    """Delivers versioned weight snapshots to the replicas registered with it."""

    @abstractmethod
    def register(
        self, replica: str, device: str = "cpu", address: str = "", collective: bool = True, owner: str = ""
    ) -> Registration:
        """Add `replica` (or replace its registration, see `may_take`); it receives the latest
        snapshot at the next sync point.

        `collective`: whether it joins a process group; `address`: its RolloutService, for a push;
        `owner`: who registers (the module doc). Raises ValueError for a registration this
        transport cannot serve (INVALID_ARGUMENT), `ReplicaNameTaken` or `TooManyReplicas`.
        """

    @abstractmethod
    def unregister(self, replica: str, registration: int = 0, owner: str = "") -> bool:
        """Remove `replica` (only that registration when non-zero); False when it was not registered.
        Raises `NotTheOwner` when `owner` did not make it."""

    @property
    @abstractmethod
    def replicas(self) -> list[str]:
        """Replicas currently served, sorted."""

    @property
    @abstractmethod
    def latest_version(self) -> int:
        """The last published version; -1 before the first."""

    @abstractmethod
    def publish(self, version: int, named: Sequence[tuple[str, torch.Tensor]]) -> PublishReport:
        """Snapshot `named` as `version` and deliver it to every live replica; blocks until done."""

    @abstractmethod
    def sync(self) -> None:
        """Apply pending membership changes and bring every replica to the latest snapshot."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving: release groups, threads and the store."""


class SyncThread:
    """A backend's maintenance thread: calls `sync()` when `due()`, checked on `wake()` and every `interval_s`.

    Registrations only mark work; this thread (or the next publish) does it, so a gRPC handler
    never waits behind a rebuild or a transfer. `closed` is set by `stop()`; a backend passes it
    to whatever long waits should end early on close.
    """

    def __init__(
        self,
        name: str,
        due: Callable[[], bool],
        sync: Callable[[], None],
        interval_s: float,
        retry_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.closed = threading.Event()
        self._due, self._sync, self._interval, self._retry_on = due, sync, interval_s, retry_on
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        self.closed.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self.closed.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self.closed.is_set():
                return
            if self._due():
                try:
                    self._sync()
                except self._retry_on:
                    log.exception("weight sync maintenance failed; retrying at the next sync point")


def transport_from_config(
    config: WeightSyncConfig,
    *,
    device: torch.device | str = "cpu",
    bind_host: str = "127.0.0.1",
    advertise_host: str | None = None,
    tls: TLSConfig | None = None,
    max_message_mb: int = 64,
) -> WeightTransport:
    """The backend `config.transport` names (`device` is where the learner's weights live)."""
    # Imported here: both backends import this module.
    from asyncopd.weightsync.grpc_transport import GrpcPush, push_weights

    def grpc_push(address: str, snapshot: Snapshot, timeout_s: float) -> None:
        push_weights(
            address, snapshot, timeout_s, tls=tls, chunk_mb=config.grpc_chunk_mb, max_message_mb=max_message_mb
        )

    if config.transport == "grpc":
        return GrpcPush(config, push=grpc_push)
    from asyncopd.weightsync.collective import CollectiveBroadcast

    return CollectiveBroadcast(
        config, device=device, bind_host=bind_host, advertise_host=advertise_host, grpc_push=grpc_push
    )
