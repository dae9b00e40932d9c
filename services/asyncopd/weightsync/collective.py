"""The collective `WeightTransport` backend: versioned, bucketed broadcast over torch.distributed.

The learner hosts the rendezvous store; `asyncopd.weightsync.membership` forms one gloo or NCCL
group per membership epoch (learner = rank 0). A fresh group first delivers the latest snapshot
to the members that lack it — late joiners — point to point from the snapshot the learner keeps
(the members that hold it only ack), so a late joiner starts from the current weights without
the others receiving them again. Each update is announced as a command key (version, manifest
JSON, per-bucket checksums, group size), then every bucket's broadcast is enqueued at once;
every member acks after receiving (and loading) it. A broadcast error or a missing ack within `timeout_s` rebuilds the
group without the dead member: a dead replica costs the learner at most ~2 x timeout_s once,
never a hang — and usually far less: a member whose heartbeat stood still for `dead_after_s` is
dropped as soon as the learner notices it while waiting, and a broadcast is abandoned (not
waited out) when a member stops beating during it.

With `weightsync.delta` the learner also encodes each publish against the previous published
snapshot (`asyncopd.weightsync.delta`: per bucket the changed 16-bit words as sparse indices or a
bitmask, or the bucket as is when that is not smaller) and broadcasts the encoded buckets — but
only when every member acked exactly that previous version (`Member.version`): a group with a
member that holds anything else gets the dense buckets, and catch-ups of late joiners are always
dense. Every command then says `keep_base`, so replicas keep the decoded buckets of the version
they applied (one copy of the model) for the next delta; a delta names the version it applies to
(`delta.base`), and a replica holding another one refuses it (`asyncopd.weightsync.subscriber`).

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
from typing import Any

import torch
import torch.distributed as dist

from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.grpc_transport import GrpcPush, PushFn
from asyncopd.weightsync.membership import Group, Member, Membership
from asyncopd.weightsync.transport import (
    Delta,
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
        signer: groups.Signer | None = None,
    ) -> None:
        """`grpc_push` reaches the `collective=False` replicas (default: `push_weights` without TLS);
        `signer` authenticates the store's values (default: the key in `ASYNCOPD_WEIGHTSYNC_KEY`)."""
        self.config = config
        self.backend = groups.resolve_backend(config.backend, device)
        self.bucket_device = groups.bucket_device(self.backend, device)
        if self.backend == "nccl":
            torch.cuda.set_device(self.bucket_device)  # NCCL binds each group to the current device
        self.timeout_s = config.timeout_s
        self._store = groups.host_store(bind_host, config.store_port, config.timeout_s)
        self._bind_host = bind_host
        self._waiter: groups.KeyWaiter | None = None  # `_acked`'s (made on first use)
        self.store_host = advertise_host or bind_host
        self.store_port = int(self._store.port)
        ids = itertools.count(1)  # one id space for both kinds of registration
        self._grpc = GrpcPush(config, push=grpc_push, ids=ids, maintenance_interval_s=maintenance_interval_s)
        self._sync_lock = threading.RLock()  # every collective op and group change
        self._latest: Snapshot | None = None
        self.delta = config.delta  # encode each publish against the previous one (the lab may flip it)
        # Pack bucket k + 1 while bucket k is on the wire (see `publish`). On by default where the
        # buckets live on a GPU: there packing (the gather and cast) and NCCL run on their own
        # streams. Off on CPU, where packing and a loopback transfer contend for the same cores:
        # measured on 2 cores (end to end, against a raw broadcast), it won at 64 MiB (R = 1:
        # 0.55-0.61 -> 0.75-0.82) and lost at 1 GiB with 4 receivers (0.55 -> 0.39). The lab may flip it.
        self.pipeline = self.bucket_device.type == "cuda"
        self._delta: Delta | None = None  # the latest snapshot encoded against the one before it
        self.sent_bytes = 0  # bytes sent to collective replicas (per receiver: a broadcast to R counts R times)
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
            signer=signer,
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
        """Pack `named` as `version` and deliver it. With `pipeline` (and no checksums or deltas,
        which need every byte first) the packing is pipelined with the broadcast: bucket k goes on
        the wire while k + 1 is packed (`_send`)."""
        start = time.perf_counter()
        previous = self._latest
        lazy = self.pipeline and not self.delta
        snapshot = Snapshot.take(version, named, previous, self.config, self.bucket_device, lazy=lazy)
        delta = Delta.between(previous, snapshot) if self.delta else None
        packed = time.perf_counter()
        rebuilds_before = self.membership.rebuilds
        with self._sync_lock:
            self._latest, self._delta = snapshot, delta
            try:
                self._sync()
            finally:
                # whatever _sync did not send is packed now: late joiners are served from it, and
                # the learner's other ranks gather in step with the packing until it is done
                try:
                    if not snapshot.failed:  # a failure was raised where it happened
                        snapshot.complete()
                finally:
                    if not snapshot.whole:  # the packing failed: keep serving the last whole snapshot
                        self._latest, self._delta = previous, None
        end = time.perf_counter()
        return PublishReport(
            version=version,
            replicas=len(self.replicas),
            nbytes=snapshot.nbytes,
            pack_seconds=snapshot.pack_seconds,
            sync_seconds=end - packed,
            rebuilds=self.membership.rebuilds - rebuilds_before,
            seconds=end - start,
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
            self._waiter = None  # its connection closes with it (no wait is left blocked)
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
            if all(m.version >= latest.version for m in group.members):
                group.sent_version = latest.version  # a group of members that all hold it (one left)
                return
            if self._send(group, latest):
                group.sent_version = latest.version
                for member in group.members:
                    member.version = latest.version
                return
            group.broken = True
            # Members may have begun decoding this delta over their base (it holds no version
            # until the update completed): the retry sends the dense buckets.
            self._delta = None
        log.error("weight sync: version %s not delivered after 3 group rebuilds", self.latest_version)

    def _send(self, group: Group, snapshot: Snapshot) -> bool:
        """Announce `snapshot`, broadcast its buckets and wait for every member's ack; False: rebuild.

        Every bucket's broadcast is enqueued at once (the snapshot's buckets are not written
        again until the next publish), so the group's threads move them back to back while the
        replicas load the ones before; this thread only watches them complete."""
        assert group.group is not None
        group.seq += 1
        seq = group.seq
        members = group.members
        # A fresh group re-sends the latest snapshot: only to the members that lack it (late
        # joiners), point to point from the snapshot; the others just ack.
        behind = [rank for rank, m in enumerate(members, start=1) if m.version < snapshot.version]
        catch_up = len(behind) < len(members)
        delta = None if catch_up else self._delta_for(members, snapshot)
        self.membership.signer.put_json(
            self._store,
            groups.command_key(group.epoch, seq),
            {
                "op": "update",
                "version": snapshot.version,
                "manifest": snapshot.manifest.json_text,
                "checksum": snapshot.digest,
                "checksums": list(snapshot.bucket_digests),
                "members": len(members),
                **({"to": behind} if catch_up else {}),
                **({"keep_base": True} if self.delta else {}),
                **({"delta": delta.announcement} if delta is not None else {}),
            },
        )
        dead: list[Member] = []

        def abandon() -> bool:
            dead[:] = self.membership.dead(members)
            return bool(dead)

        works: list[Any] = []
        try:
            pg = group.group
            if catch_up:
                payloads = snapshot.buckets
                works = [groups.send(pg, b, rank, tag) for rank in behind for tag, b in enumerate(payloads)]
            elif delta is not None:
                # An unchanged bucket's delta is empty: nothing to send (its receivers post nothing either).
                payloads = [b.payload for b in delta.buckets]
                works = [groups.post(pg, b, self.timeout_s) for b in payloads if b.numel()]
            else:
                # Each bucket is posted as soon as it is packed: the group's threads move bucket k
                # while this thread packs k + 1.
                payloads = []
                for k in range(len(snapshot.manifest.bucket_sizes)):
                    payloads.append(snapshot.bucket(k))
                    works.append(groups.post(pg, payloads[-1], self.timeout_s))
            nbytes = sum(int(p.numel()) for p in payloads)
            self.sent_bytes += nbytes * (len(behind) if catch_up else len(members))
            if not groups.watch(works, self.timeout_s, abandon=abandon):
                log.warning(
                    "weight sync epoch %d: %s stopped beating during the broadcast of version %d; rebuilding",
                    group.epoch,
                    ", ".join(m.replica for m in dead),
                    snapshot.version,
                )
                return False
        except (dist.DistError, RuntimeError) as exc:
            if snapshot.failed:  # the packing failed, not the broadcast: so does the publish
                group.broken = True  # its buckets were announced: the next sync starts a fresh group
                raise
            log.warning("weight sync epoch %d: broadcast of version %d failed: %s", group.epoch, snapshot.version, exc)
            return False
        return self._acked(group, seq, snapshot.version)

    def _delta_for(self, members: Sequence[Member], snapshot: Snapshot) -> Delta | None:
        """The delta of `snapshot` when every member acked exactly the version it was encoded
        against; None: send the dense buckets."""
        delta = self._delta
        if delta is None or delta.version != snapshot.version:
            return None
        return delta if delta.applies_to([m.version for m in members]) else None

    def _acked(self, group: Group, seq: int, version: int) -> bool:
        """Whether every member acked command `seq` within `timeout_s` (False early when one stops beating).

        The member whose ack completes the count sets the done key; the learner sleeps in the
        store until it is written (`groups.KeyWaiter`, on a connection of its own), so it learns
        of it at once and makes no round trips meanwhile (acks follow the broadcast by the
        replicas' load of their last bucket). Every 0.1 s it counts the acks and asks who stopped
        beating; a wait given up that way is released by writing the done key itself."""
        expected = len(group.members)
        deadline = time.monotonic() + self.timeout_s
        key = groups.ack_key(group.epoch, seq)
        done = groups.done_key(group.epoch, seq)
        outcome: list[bool] = []

        def abandon() -> bool:
            if int(self._store.add(key, 0)) >= expected:
                outcome.append(True)  # every ack counted; the done key follows
                return True
            silent = self.membership.dead(group.members)
            if silent:
                log.warning(
                    "weight sync epoch %d: %s stopped beating while version %d was acked; rebuilding",
                    group.epoch,
                    ", ".join(m.replica for m in silent),
                    version,
                )
                outcome.append(False)
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "weight sync epoch %d: only %d of %d replicas acked version %d within %.1fs",
                    group.epoch,
                    int(self._store.add(key, 0)),
                    expected,
                    version,
                    self.timeout_s,
                )
                outcome.append(False)
                return True
            return False

        waiter = self._ack_waiter()
        try:
            if not waiter.wait(done, self._maintenance.closed, check_s=0.1, abandon=abandon):
                return bool(outcome and outcome[0])
        finally:
            if waiter.pending is not None and not waiter.release(self._store):
                self._waiter = None  # still blocked: the next update waits on a new connection
        # The done key is signed (a forged one is refused); the ack counter cannot be (see
        # `asyncopd.weightsync.groups`): a forged ack only makes this return early.
        if not self.membership.signer.present(self._store, done, written=True):
            # A forged done key woke the waiter: count the acks every 10 ms until the deadline.
            while not abandon():
                if self._maintenance.closed.wait(0.01):
                    return False
            return outcome[-1]
        return int(self._store.add(key, 0)) >= expected

    def _ack_waiter(self) -> groups.KeyWaiter:
        """The waiter `_acked` sleeps in, on its own connection to this learner's store."""
        if self._waiter is None:
            host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._bind_host, self._bind_host)
            self._waiter = groups.KeyWaiter(groups.connect_store(host, self.store_port, self.timeout_s))
        return self._waiter
