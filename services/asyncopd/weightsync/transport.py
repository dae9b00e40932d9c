"""The learner's one view of weight sync: the `WeightTransport` interface, and the factory that picks a backend.

Replicas register with a transport (the learner servicer forwards RegisterReplica /
UnregisterReplica), and the training loop publishes every new version through it. Two backends:

- `asyncopd.weightsync.collective.CollectiveBroadcast` (`weightsync.transport: collective`, the
  default): a torch.distributed group per membership epoch (gloo or NCCL), bucketed broadcast,
  acks; replicas that register with `collective=false` get the same snapshots by gRPC push.
- `asyncopd.weightsync.grpc_transport.GrpcPush` (`weightsync.transport: grpc`): every replica
  gets each snapshot streamed to its RolloutService (PushWeights); no process group, no store.

Both keep the latest packed `Snapshot` (one extra copy of the weights), so late joiners are
served without reading parameters the optimizer is changing. This module knows the shared
records and the interface; it knows nothing of process groups, stores or gRPC.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync.manifest import Manifest, checksum, pack, plan

log = logging.getLogger(__name__)

_MIB = 1 << 20


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


@dataclass(frozen=True)
class Snapshot:
    """One packed update: the version it carries, its layout, its bytes and their digest."""

    version: int
    manifest: Manifest
    buckets: list[torch.Tensor]
    digest: str

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes

    @classmethod
    def take(
        cls,
        version: int,
        named: Sequence[tuple[str, torch.Tensor]],
        previous: Snapshot | None,
        config: WeightSyncConfig,
        device: torch.device,
    ) -> Snapshot:
        """Copy `named` into buckets on `device` as `version`; versions must move forward."""
        if previous is not None and version <= previous.version:
            raise ValueError(f"version {version} is not newer than the last published {previous.version}")
        if previous is not None and [n for n, _ in named] == [t.name for t in previous.manifest.tensors]:
            manifest = previous.manifest  # the same model: reuse the layout
        else:
            manifest = plan(named, int(config.bucket_mb * _MIB))
        buckets = pack(named, manifest, device)
        return cls(version, manifest, buckets, checksum(buckets) if config.checksum else "")


@dataclass(frozen=True)
class PublishReport:
    """What one publish did (for metrics and logs)."""

    version: int
    replicas: int
    nbytes: int
    pack_seconds: float
    sync_seconds: float
    rebuilds: int


class WeightTransport(ABC):
    """Delivers versioned weight snapshots to the replicas registered with it."""

    @abstractmethod
    def register(self, replica: str, device: str = "cpu", address: str = "", collective: bool = True) -> Registration:
        """Add (or replace) `replica`; it receives the latest snapshot at the next sync point.

        `collective`: whether it joins a process group; `address`: its RolloutService, for a push.
        Raises ValueError for a registration this transport cannot serve (INVALID_ARGUMENT).
        """

    @abstractmethod
    def unregister(self, replica: str, registration: int = 0) -> bool:
        """Remove `replica` (only that registration when non-zero); False when it was not registered."""

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
