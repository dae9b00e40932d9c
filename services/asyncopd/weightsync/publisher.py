"""The learner's side of weight sync: membership epochs, bucketed versioned broadcast, fallbacks.

Protocol (the subscriber module is the other half; keys in `asyncopd.weightsync.groups`):

1. A replica registers over gRPC (the learner servicer calls `Publisher.register`) and gets the
   store address and a registration id. Joins and leaves only mark the membership dirty.
2. At the next sync point (a publish, or the maintenance thread within ~0.2 s) the publisher
   forms a new *membership epoch*: it tells the old group to `rebuild`, writes each member's
   next assignment (epoch, rank, world), waits up to `timeout_s` for every member's ready key,
   drops those that never came (writing them a `dropped` assignment so a slow one re-registers),
   says `go`, and connects a fresh group (learner = rank 0).
3. A fresh group first receives the latest snapshot, so a late joiner starts from the current
   weights. Each update is announced as a command key (version, manifest JSON, checksum), then
   its buckets are broadcast; every member acks after receiving and verifying it. A broadcast
   error or a missing ack within `timeout_s` rebuilds the group without the dead member: a dead
   replica costs the learner at most ~2 x timeout_s once, never a hang — and usually far less:
   every replica bumps a heartbeat counter in the store (`asyncopd.weightsync.liveness`), and a
   member whose heartbeat stood still for `dead_after_s` is dropped as soon as the learner
   notices it while waiting (for ready keys or acks).

Scaling choice: one group per membership epoch (not one group per replica). A broadcast to R
replicas is then one collective instead of R point-to-point sends; the price is a rebuild of
the whole group on every membership change, which happens rarely (measured in the
`asyncopd bench weightsync` figures in docs/weightsync.md).

Replicas that cannot join a collective (`collective=False`) get the same snapshot pushed over
gRPC (RolloutService.PushWeights), one sender thread each, under the same timeout.

The publisher keeps the latest packed snapshot (one extra copy of the weights, on the bucket
device) so late joiners and rebuilt groups can be served without touching live parameters.
It knows torch.distributed and the manifest; it knows nothing of optimizers or the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.liveness import Liveness, MemberKey
from asyncopd.weightsync.manifest import Manifest, checksum, pack, plan

log = logging.getLogger(__name__)

_MIB = 1 << 20


@dataclass(frozen=True)
class Registration:
    """What a registering replica needs to join: the store, its id, the backend and timeouts."""

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


@dataclass(frozen=True)
class PublishReport:
    """What one publish did (for metrics and logs)."""

    version: int
    replicas: int
    nbytes: int
    pack_seconds: float
    sync_seconds: float
    rebuilds: int


@dataclass
class _Member:
    replica: str
    registration: int
    device: str
    address: str
    collective: bool
    next_assignment: int = 0
    pushed_version: int = -1  # gRPC members: last version pushed


@dataclass
class _Group:
    epoch: int
    group: groups.Group | None
    members: list[_Member]
    seq: int = 0
    sent_version: int = -1
    broken: bool = False


# (replica address, snapshot, timeout_s) -> anything; raises when the replica did not take it
GrpcPush = Callable[[str, Snapshot, float], object]


class Publisher:
    """Host the rendezvous store, track membership, and broadcast versioned weight snapshots."""

    def __init__(
        self,
        config: WeightSyncConfig,
        *,
        device: torch.device | str = "cpu",
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        grpc_push: GrpcPush | None = None,
        maintenance_interval_s: float = 0.2,
    ) -> None:
        self.config = config
        self.backend = groups.resolve_backend(config.backend, device)
        self.bucket_device = groups.bucket_device(self.backend, device)
        if self.backend == "nccl":
            torch.cuda.set_device(self.bucket_device)  # NCCL binds each group to the current device
        self.timeout_s = config.timeout_s
        self._store = groups.host_store(bind_host, config.store_port, config.timeout_s)
        self.store_host = advertise_host or bind_host
        self.store_port = int(self._store.port)
        self._grpc_push = grpc_push
        self._members: dict[str, _Member] = {}
        self._members_lock = threading.Lock()  # registration never waits behind a broadcast
        self._sync_lock = threading.RLock()  # every collective op and group change
        self._dirty = False
        self._registrations = 0
        self._epoch = 0
        self._group: _Group | None = None
        self._latest: Snapshot | None = None
        self._rebuilds = 0
        self._liveness = Liveness(self._read_heartbeat, config.dead_after_s)
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._interval = maintenance_interval_s
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="weightsync-push")
        self._thread = threading.Thread(target=self._maintain, name="weightsync-maintenance", daemon=True)
        self._thread.start()

    # ---- membership (called from gRPC handler threads) ----------------------------------------

    def register(self, replica: str, device: str = "cpu", address: str = "", collective: bool = True) -> Registration:
        if not replica:
            raise ValueError("replica name must be non-empty")
        if not collective and not address:
            raise ValueError(f"replica {replica!r}: collective=false needs its RolloutService address for PushWeights")
        if collective and self.backend == "nccl" and torch.device(device).type != "cuda":
            raise ValueError(f"replica {replica!r} runs on {device!r} but the broadcast backend is nccl (CUDA only)")
        with self._members_lock:
            self._registrations += 1
            member = _Member(replica, self._registrations, device, address, collective)
            replaced = self._members.get(replica)
            self._members[replica] = member
            self._dirty = True
            world = 1 + sum(1 for m in self._members.values() if m.collective)
        if replaced is not None:
            log.info(
                "replica %s re-registered (registration %d replaces %d)",
                replica,
                member.registration,
                replaced.registration,
            )
        self._wake.set()
        latest = self._latest
        return Registration(
            store_host=self.store_host,
            store_port=self.store_port,
            registration=member.registration,
            membership_epoch=self._epoch + 1,
            world_size=world,
            version=latest.version if latest is not None else -1,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )

    def unregister(self, replica: str, registration: int = 0) -> bool:
        with self._members_lock:
            member = self._members.get(replica)
            if member is None or (registration and member.registration != registration):
                return False
            del self._members[replica]
            self._dirty = True
        self._wake.set()
        return True

    @property
    def replicas(self) -> list[str]:
        """Replicas currently serving (in the live group, or reached over gRPC)."""
        with self._members_lock:
            grpc_members = [m.replica for m in self._members.values() if not m.collective]
        group = self._group
        return sorted([m.replica for m in (group.members if group else [])] + grpc_members)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def latest_version(self) -> int:
        return self._latest.version if self._latest is not None else -1

    # ---- publishing (called by the training loop) ---------------------------------------------

    def publish(self, version: int, named: Sequence[tuple[str, torch.Tensor]]) -> PublishReport:
        """Snapshot `named` as `version` and deliver it to every live replica; blocks until done."""
        start = time.perf_counter()
        latest = self._latest
        if latest is not None and version <= latest.version:
            raise ValueError(f"version {version} is not newer than the last published {latest.version}")
        if latest is not None and [n for n, _ in named] == [t.name for t in latest.manifest.tensors]:
            manifest = latest.manifest
        else:
            manifest = plan(named, int(self.config.bucket_mb * _MIB))
        buckets = pack(named, manifest, self.bucket_device)
        digest = checksum(buckets) if self.config.checksum else ""
        snapshot = Snapshot(version, manifest, buckets, digest)
        packed = time.perf_counter()
        rebuilds_before = self._rebuilds
        with self._sync_lock:
            self._latest = snapshot
            self._sync()
        return PublishReport(
            version=version,
            replicas=len(self.replicas),
            nbytes=snapshot.nbytes,
            pack_seconds=packed - start,
            sync_seconds=time.perf_counter() - packed,
            rebuilds=self._rebuilds - rebuilds_before,
        )

    def sync(self) -> None:
        """Apply pending membership changes and bring every member to the latest snapshot."""
        with self._sync_lock:
            self._sync()

    def close(self) -> None:
        """Tell the group to disband, stop the maintenance thread and the store."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.timeout_s + 5)
        with self._sync_lock:
            group = self._group
            if group is not None and group.group is not None:
                group.seq += 1
                groups.put_json(self._store, groups.command_key(group.epoch, group.seq), {"op": "rebuild"})
            self._group = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals (hold _sync_lock) ------------------------------------------------------------

    def _maintain(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            if self._dirty or (self._group is not None and self._group.broken):
                try:
                    self.sync()
                except (dist.DistError, RuntimeError):
                    log.exception("weight sync maintenance failed; retrying at the next sync point")

    def _sync(self) -> None:
        for _attempt in range(3):
            if self._dirty or self._group is None or self._group.broken:
                self._rebuild()
            group = self._group
            assert group is not None
            latest = self._latest
            self._push_grpc(latest)
            if latest is None or group.sent_version >= latest.version or not group.members:
                return
            if self._send(group, latest):
                group.sent_version = latest.version
                return
            group.broken = True
        log.error("weight sync: version %s not delivered after 3 group rebuilds", self.latest_version)

    def _announce_rebuild(self, group: _Group) -> None:
        if group.group is None:
            return
        group.seq += 1
        groups.put_json(self._store, groups.command_key(group.epoch, group.seq), {"op": "rebuild"})
        # Members still inside a broadcast of it see the rebuild command and abandon it; the group
        # itself may hold an abandoned broadcast until its timeout, so it is retired, not destroyed
        # here (destroying waits for that broadcast).
        pg, group.group = group.group, None
        groups.retire(pg, self.timeout_s)

    def _read_heartbeat(self, key: MemberKey) -> int | None:
        name = groups.heartbeat_key(*key)
        if not self._store.check([name]):
            return None
        return int(self._store.add(name, 0))

    def _dead(self, members: Sequence[_Member]) -> list[_Member]:
        """Members whose heartbeat stood still for dead_after_s (see asyncopd.weightsync.liveness)."""
        dead = set(self._liveness.dead([(m.replica, m.registration) for m in members]))
        return [m for m in members if (m.replica, m.registration) in dead]

    def _drop(self, members: Sequence[_Member], reason: str) -> None:
        with self._members_lock:
            for member in members:
                self._liveness.forget((member.replica, member.registration))
                current = self._members.get(member.replica)
                if current is member:
                    del self._members[member.replica]
                groups.put_json(
                    self._store,
                    groups.assign_key(member.replica, member.registration, member.next_assignment),
                    {"dropped": True, "reason": reason},
                )
                member.next_assignment += 1
        for member in members:
            log.warning("replica %s dropped from weight sync: %s", member.replica, reason)

    def _rebuild(self) -> None:
        self._rebuilds += 1
        # Members of a failed group may sit in its broadcast until their own timeout before
        # they look for the next assignment: give them that long on top before dropping them.
        ready_s = self.timeout_s
        if self._group is not None:
            if self._group.broken:
                ready_s = 2 * self.timeout_s + 1.0
            self._announce_rebuild(self._group)
        while True:
            with self._members_lock:
                self._dirty = False
                members = [m for m in self._members.values() if m.collective]
            self._epoch += 1
            epoch = self._epoch
            world = len(members) + 1
            if not members:
                self._group = _Group(epoch=epoch, group=None, members=[])
                return
            for rank, member in enumerate(members, start=1):
                groups.put_json(
                    self._store,
                    groups.assign_key(member.replica, member.registration, member.next_assignment),
                    {"epoch": epoch, "rank": rank, "world": world, "backend": self.backend},
                )
                member.next_assignment += 1
            missing, dead = self._wait_ready(epoch, members, ready_s)
            if missing:
                self._store.set(groups.go_key(epoch), "abort")
                reason = (
                    f"heartbeat stood still for {self._liveness.dead_after_s:.1f}s"
                    if dead
                    else f"not ready for membership epoch {epoch} within {ready_s:.1f}s"
                )
                self._drop(missing, reason)
                ready_s = self.timeout_s
                continue
            self._store.set(groups.go_key(epoch), "build")
            try:
                pg = groups.make_group(
                    self._store, epoch, rank=0, world=world, backend=self.backend, timeout_s=self.timeout_s
                )
            except (dist.DistError, RuntimeError) as exc:
                log.warning("membership epoch %d: group did not form (%s); retrying", epoch, exc)
                continue
            self._group = _Group(epoch=epoch, group=pg, members=members)
            log.info(
                "weight sync: membership epoch %d formed with %d replica(s): %s",
                epoch,
                len(members),
                ", ".join(m.replica for m in members),
            )
            return

    def _wait_ready(self, epoch: int, members: Sequence[_Member], timeout_s: float) -> tuple[list[_Member], bool]:
        """(members not ready within `timeout_s`, whether the wait ended early because all of them are dead)."""
        deadline = time.monotonic() + timeout_s
        pending = {rank: m for rank, m in enumerate(members, start=1)}
        next_liveness = 0.0
        while pending and time.monotonic() < deadline and not self._closed.is_set():
            for rank in [r for r in pending if self._store.check([groups.ready_key(epoch, r)])]:
                del pending[rank]
            if pending and time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + 0.1
                if len(self._dead(list(pending.values()))) == len(pending):
                    return list(pending.values()), True
            if pending:
                time.sleep(0.01)
        return list(pending.values()), False

    def _send(self, group: _Group, snapshot: Snapshot) -> bool:
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
        dead: list[_Member] = []

        def abandon() -> bool:
            dead[:] = self._dead(members)
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
        expected = len(group.members)
        deadline = time.monotonic() + self.timeout_s
        key = groups.ack_key(group.epoch, seq)
        next_liveness = 0.0
        while int(self._store.add(key, 0)) < expected:
            if time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + 0.1
                silent = self._dead(members)
                if silent:
                    log.warning(
                        "weight sync epoch %d: %s stopped beating while version %d was acked; rebuilding",
                        group.epoch,
                        ", ".join(m.replica for m in silent),
                        snapshot.version,
                    )
                    return False
            if time.monotonic() >= deadline:
                log.warning(
                    "weight sync epoch %d: only %d of %d replicas acked version %d within %.1fs",
                    group.epoch,
                    int(self._store.add(key, 0)),
                    expected,
                    snapshot.version,
                    self.timeout_s,
                )
                return False
            time.sleep(0.002)
        return True

    def _push_grpc(self, snapshot: Snapshot | None) -> None:
        if snapshot is None or self._grpc_push is None:
            return
        with self._members_lock:
            targets = [m for m in self._members.values() if not m.collective and m.pushed_version < snapshot.version]
        if not targets:
            return
        push = self._grpc_push
        jobs = {self._pool.submit(push, m.address, snapshot, self.timeout_s): m for m in targets}
        failed: list[_Member] = []
        for job, member in jobs.items():
            try:
                job.result(timeout=self.timeout_s + 1)
                member.pushed_version = snapshot.version
            except Exception as exc:
                log.warning("PushWeights to %s (%s) failed: %s", member.replica, member.address, exc)
                failed.append(member)
        if failed:
            self._drop(failed, "gRPC PushWeights failed")
