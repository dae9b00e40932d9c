"""The collective `WeightTransport` backend: versioned, bucketed broadcast over torch.distributed.

The learner hosts the rendezvous store; `asyncopd.weightsync.membership` forms one gloo or NCCL
group per membership epoch (learner = rank 0). A fresh group first receives the latest snapshot,
so a late joiner starts from the current weights. Each update is announced as a command key
(version, manifest JSON, checksum), then its buckets are broadcast; every member acks after
receiving and verifying it. A broadcast error or a missing ack within `timeout_s` rebuilds the
group without the dead member: a dead replica costs the learner at most ~2 x timeout_s once,
never a hang — and usually far less: a member whose heartbeat stood still for `dead_after_s` is
dropped as soon as the learner notices it while waiting, and a broadcast is abandoned (not
waited out) when a member stops beating during it.

Replicas that cannot join a collective (`collective=False`) are handed to a `GrpcPush`
(`asyncopd.weightsync.grpc_transport`) that gets the same snapshots, at the same sync points.
One name holds one registration of either kind; `weightsync.max_replicas` caps both together.

It knows torch.distributed, the manifest and the store's command/ack keys; it knows nothing of
optimizers or the cache.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.grpc_transport import GrpcPush, PushFn
from asyncopd.weightsync.membership import Group, Member, Membership
from asyncopd.weightsync.transport import (
    PublishReport,
    Registration,
    Snapshot,
    SyncThread,
    WeightTransport,
    check_room,
)

log = logging.getLogger(__name__)


class CollectiveBroadcast(WeightTransport):
    """Host the rendezvous store, keep the membership's group current, and broadcast snapshots to it."""

    def __init__(
        self,
        config: WeightSyncConfig,
        *,
        device: torch.device | str = "cpu",
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        grpc_push: PushFn | None = None,
        maintenance_interval_s: float = 0.2,
    ) -> None:
        """`grpc_push` reaches the `collective=False` replicas (default: `push_weights` without TLS)."""
        self.config = config
        self.backend = groups.resolve_backend(config.backend, device)
        self.bucket_device = groups.bucket_device(self.backend, device)
        if self.backend == "nccl":
            torch.cuda.set_device(self.bucket_device)  # NCCL binds each group to the current device
        self.timeout_s = config.timeout_s
        self._store = groups.host_store(bind_host, config.store_port, config.timeout_s)
        self.store_host = advertise_host or bind_host
        self.store_port = int(self._store.port)
        ids = itertools.count(1)  # one id space for both kinds of registration
        self._grpc = GrpcPush(config, push=grpc_push, ids=ids, maintenance_interval_s=maintenance_interval_s)
        self._sync_lock = threading.RLock()  # every collective op and group change
        self._latest: Snapshot | None = None
        self._maintenance = SyncThread(
            "weightsync-maintenance",
            self._due,
            self.sync,
            maintenance_interval_s,
            retry_on=(dist.DistError, RuntimeError),
        )
        self.membership = Membership(
            self._store,
            backend=self.backend,
            timeout_s=config.timeout_s,
            dead_after_s=config.dead_after_s,
            closed=self._maintenance.closed,
            ids=ids,
            max_members=config.max_replicas,
        )
        self._registering = threading.Lock()  # one registration at a time: the cap counts both kinds
        self._maintenance.start()

    # ---- registrations (gRPC handler threads) ----------------------------------------------------

    def register(
        self, replica: str, device: str = "cpu", address: str = "", collective: bool = True, owner: str = ""
    ) -> Registration:
        if not replica:
            raise ValueError("replica name must be non-empty")
        if collective and self.backend == "nccl" and torch.device(device).type != "cuda":
            raise ValueError(f"replica {replica!r} runs on {device!r}, the broadcast backend is nccl (CUDA only)")
        if not collective and not address:
            raise ValueError(f"replica {replica!r}: collective=false needs its RolloutService address for PushWeights")
        with self._registering:
            if replica not in self.membership and replica not in self._grpc:
                check_room(self.membership.registered + len(self._grpc.replicas), self.config.max_replicas, replica)
            # One registration per name, of either kind: the other kind's gives way first
            # (or the name is refused, and nothing changed).
            if not collective:
                if self.membership.release(replica, owner):
                    self._maintenance.wake()
                registration = self._grpc.register(replica, device, address, collective=False, owner=owner).registration
            else:
                self._grpc.release(replica, owner)
                registration = self.membership.join(replica, device, owner).registration
                self._maintenance.wake()
        return Registration(
            store_host=self.store_host,
            store_port=self.store_port,
            registration=registration,
            membership_epoch=self.membership.epoch + 1,
            world_size=1 + self.membership.registered,
            version=self.latest_version,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )

    def unregister(self, replica: str, registration: int = 0, owner: str = "") -> bool:
        if self.membership.leave(replica, registration, owner):
            self._maintenance.wake()
            return True
        return self._grpc.unregister(replica, registration, owner)

    @property
    def replicas(self) -> list[str]:
        """Replicas currently serving (in the live group, or reached over gRPC)."""
        return sorted(self.membership.in_group + self._grpc.replicas)

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def latest_version(self) -> int:
        return self._latest.version if self._latest is not None else -1

    # ---- publishing (the training loop) ----------------------------------------------------------

    def publish(self, version: int, named: Sequence[tuple[str, torch.Tensor]]) -> PublishReport:
        start = time.perf_counter()
        snapshot = Snapshot.take(version, named, self._latest, self.config, self.bucket_device)
        packed = time.perf_counter()
        rebuilds_before = self.membership.rebuilds
        with self._sync_lock:
            self._latest = snapshot
            self._sync()
        return PublishReport(
            version=version,
            replicas=len(self.replicas),
            nbytes=snapshot.nbytes,
            pack_seconds=packed - start,
            sync_seconds=time.perf_counter() - packed,
            rebuilds=self.membership.rebuilds - rebuilds_before,
        )

    def sync(self) -> None:
        with self._sync_lock:
            self._sync()

    def close(self) -> None:
        """Tell the group to disband, stop the maintenance threads and the pushes."""
        self._maintenance.stop(self.timeout_s + 5)
        with self._sync_lock:
            self.membership.disband()
            self.membership.group = None
        self._grpc.close()

    # ---- internals (hold _sync_lock) -------------------------------------------------------------

    def _due(self) -> bool:
        group = self.membership.group
        return self.membership.dirty or (group is not None and group.broken)

    def _sync(self) -> None:
        membership = self.membership
        for _attempt in range(3):
            if membership.dirty or membership.group is None or membership.group.broken:
                membership.rebuild()
            group = membership.group
            assert group is not None
            latest = self._latest
            if latest is not None:
                self._grpc.deliver(latest)
            if latest is None or group.sent_version >= latest.version or not group.members:
                return
            if self._send(group, latest):
                group.sent_version = latest.version
                return
            group.broken = True
        log.error("weight sync: version %s not delivered after 3 group rebuilds", self.latest_version)

    def _send(self, group: Group, snapshot: Snapshot) -> bool:
        """Announce `snapshot`, broadcast its buckets and wait for every member's ack; False: rebuild."""
        assert group.group is not None
        group.seq += 1
        seq = group.seq
        groups.put_json(
            self._store,
            groups.command_key(group.epoch, seq),
            {
                "op": "update",
                "version": snapshot.version,
                "manifest": snapshot.manifest.to_json(),
                "checksum": snapshot.digest,
            },
        )
        members = group.members
        dead: list[Member] = []

        def abandon() -> bool:
            dead[:] = self.membership.dead(members)
            return bool(dead)

        try:
            for bucket in snapshot.buckets:
                if not groups.broadcast(group.group, bucket, self.timeout_s, abandon=abandon):
                    log.warning(
                        "weight sync epoch %d: %s stopped beating during the broadcast of version %d; rebuilding",
                        group.epoch,
                        ", ".join(m.replica for m in dead),
                        snapshot.version,
                    )
                    return False
        except (dist.DistError, RuntimeError) as exc:
            log.warning("weight sync epoch %d: broadcast of version %d failed: %s", group.epoch, snapshot.version, exc)
            return False
        return self._acked(group, seq, snapshot.version)

    def _acked(self, group: Group, seq: int, version: int) -> bool:
        """Whether every member acked command `seq` within `timeout_s` (False early when one stops beating)."""
        expected = len(group.members)
        deadline = time.monotonic() + self.timeout_s
        key = groups.ack_key(group.epoch, seq)
        next_liveness = 0.0
        while int(self._store.add(key, 0)) < expected:
            if time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + 0.1
                silent = self.membership.dead(group.members)
                if silent:
                    log.warning(
                        "weight sync epoch %d: %s stopped beating while version %d was acked; rebuilding",
                        group.epoch,
                        ", ".join(m.replica for m in silent),
                        version,
                    )
                    return False
            if time.monotonic() >= deadline:
                log.warning(
                    "weight sync epoch %d: only %d of %d replicas acked version %d within %.1fs",
                    group.epoch,
                    int(self._store.add(key, 0)),
                    expected,
                    version,
                    self.timeout_s,
                )
                return False
            time.sleep(0.002)
        return True
