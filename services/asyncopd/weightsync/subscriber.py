"""A rollout replica's side of weight sync: register, join each membership epoch, receive updates.

`run_subscriber(...)` blocks (run it in a thread) until `stop` is set. It registers with the
learner over gRPC, follows its group assignments through the learner's store (the protocol is in
`asyncopd.weightsync.membership` and `.collective`), receives every update's buckets by broadcast,
verifies them (optional checksum), acks, and then hands `(version, [(name, tensor), ...])` to
`apply` — the engine's `load_weights`.

The store an update is announced through is writable by every registered replica, so its
manifest is checked before a byte is allocated for it: consistent (`Manifest.validate`) and,
given the receiving model (`expected`: names, shapes, optionally dtypes), holding only the
model's own tensors — so it never asks for more than the model's size; without a model, an
announcement larger than the receive device's free memory is refused. A refused announcement
is a `ManifestError`: the subscriber registers again instead of allocating. An update
whose version the replica already holds (a rebuilt group re-sending it) is acked, not re-applied.
The tensors handed to `apply` are views into fresh receive buffers: `apply` may keep them.

If the learner goes away (its store refuses connections) or drops this replica, the subscriber
registers again with a backoff, so a restarted learner picks its replicas back up.

It knows the store protocol and torch.distributed; it knows nothing of engines or generation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping

import grpc
import torch
import torch.distributed as dist

from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.manifest import Manifest, ManifestError, ParamSpec, checksum
from asyncopd.wire.learner_client import LearnerClient, ReplicaRegistration
from asyncopd.wire.rpc import channel

log = logging.getLogger(__name__)

Apply = Callable[[int, Iterable[tuple[str, torch.Tensor]]], None]


class Dropped(RuntimeError):
    """The learner removed this registration from the broadcast (it will register again)."""


class Refused(ManifestError):
    """An announced update this replica will not allocate (not its model's, or too large)."""


class Subscriber:
    """One registration's life: assignments -> groups -> updates, until dropped or stopped."""

    def __init__(
        self,
        client: LearnerClient,
        replica: str,
        apply: Apply,
        stop: threading.Event,
        *,
        device: torch.device | str = "cpu",
        expected: Mapping[str, ParamSpec] | None = None,
        verify_checksum: bool = False,
        heartbeat_s: float = 0.5,
    ) -> None:
        self.client = client
        self.heartbeat_s = heartbeat_s
        self.replica = replica
        self.apply = apply
        self.stop = stop
        self.device = torch.device(device)
        self.expected = expected
        self.verify_checksum = verify_checksum
        self.version = -1  # last applied version
        self.updates = 0  # updates applied

    def run(self) -> None:
        """Register and follow assignments until `stop` (returns) or dropped / learner gone (raises)."""
        reg = self.client.register(self.replica, collective=True, device=str(self.device))
        # A new registration may be with a restarted learner that resumed from an older
        # checkpoint: whatever it sends first is applied, even at a version seen before.
        self.version = -1
        store = groups.connect_store(reg.store_host, reg.store_port, reg.timeout_s)
        log.info("replica %s registered with the learner (registration %d)", self.replica, reg.registration)
        beating = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(reg, beating), name=f"weightsync-heartbeat-{self.replica}", daemon=True
        )
        beat.start()
        try:
            k = 0
            while not self.stop.is_set():
                raw = groups.poll_key(store, groups.assign_key(self.replica, reg.registration, k), self.stop)
                if raw is None:
                    return
                k += 1
                assignment = json.loads(raw)
                if assignment.get("dropped"):
                    raise Dropped(str(assignment.get("reason", "dropped by the learner")))
                self._join(store, assignment, reg.timeout_s)
        finally:
            beating.set()
            # Always: a registration left behind would hold this name until it is judged dead,
            # and the next registration of it would be refused until then.
            self._unregister(reg.registration)

    def _heartbeat(self, reg: ReplicaRegistration, done: threading.Event) -> None:
        """Bump this registration's heartbeat counter until `done` (own store connection: it beats
        even while the main thread sits in a broadcast); a store that went away ends it quietly."""
        key = groups.heartbeat_key(self.replica, reg.registration)
        try:
            store = groups.connect_store(reg.store_host, reg.store_port, reg.timeout_s)
            while not done.is_set() and not self.stop.is_set():
                store.add(key, 1)
                done.wait(self.heartbeat_s)
        except (dist.DistError, RuntimeError) as exc:
            log.debug("replica %s: heartbeat ended: %s", self.replica, exc)

    def _unregister(self, registration: int) -> None:
        try:
            self.client.unregister(self.replica, registration)
        except grpc.RpcError as exc:
            log.info("replica %s: unregister failed (learner gone?): %s", self.replica, exc.code())

    def _join(self, store: dist.Store, assignment: dict[str, object], timeout_s: float) -> None:
        epoch, rank, world = int(assignment["epoch"]), int(assignment["rank"]), int(assignment["world"])  # type: ignore[call-overload]
        backend = groups.resolve_backend(str(assignment["backend"]), self.device)
        if backend == "nccl":
            torch.cuda.set_device(self.device)  # NCCL binds the group to the current device
        store.set(groups.ready_key(epoch, rank), "1")
        go = groups.poll_key(store, groups.go_key(epoch), self.stop, timeout_s=2 * timeout_s)
        if go != "build":
            return
        try:
            pg = groups.make_group(store, epoch, rank=rank, world=world, backend=backend, timeout_s=timeout_s)
        except (dist.DistError, RuntimeError) as exc:
            log.warning("replica %s: group of epoch %d did not form: %s", self.replica, epoch, exc)
            return
        log.info("replica %s joined membership epoch %d as rank %d of %d", self.replica, epoch, rank, world)
        buffers = groups.bucket_device(backend, self.device)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            raw = groups.poll_key(store, groups.command_key(epoch, seq), self.stop, interval_s=0.005)
            if raw is None:
                return
            command = json.loads(raw)
            if command["op"] != "update":
                return  # rebuild: the next assignment says where to go
            version = int(command["version"])
            try:
                manifest = Manifest.from_json(command["manifest"])
            except (ManifestError, KeyError, TypeError, ValueError) as exc:
                raise Refused(f"malformed manifest: {exc}") from exc
            self._check_size(manifest, buffers)  # before allocating what it announces
            buckets = manifest.empty_buckets(buffers)
            # The learner announces a rebuild as the next command: then this broadcast cannot
            # complete (a member died or froze), so stop waiting for it instead of timing out.
            rebuild = groups.command_key(epoch, seq + 1)

            def abandon(rebuild: str = rebuild) -> bool:
                return self.stop.is_set() or bool(store.check([rebuild]))

            try:
                for bucket in buckets:
                    if not groups.broadcast(pg, bucket, timeout_s, abandon=abandon):
                        log.info("replica %s: broadcast of version %d abandoned for a rebuild", self.replica, version)
                        groups.retire(pg, timeout_s)
                        return
            except (dist.DistError, RuntimeError) as exc:
                log.warning(
                    "replica %s: broadcast of version %d failed (%s); waiting for a rebuild", self.replica, version, exc
                )
                return
            self._verify(manifest, buckets, str(command.get("checksum", "")), version)
            store.add(groups.ack_key(epoch, seq), 1)
            if version > self.version:
                self.apply(version, manifest.unpack(buckets))
                self.version = version
                self.updates += 1

    def _check_size(self, manifest: Manifest, device: torch.device) -> None:
        if self.expected is not None:
            try:
                manifest.check_fits(self.expected)
            except ManifestError as exc:
                raise Refused(str(exc)) from exc
            return
        free = _free_bytes(device)
        if manifest.total_bytes > free:
            raise Refused(
                f"update announces {manifest.total_bytes} bytes, {device} has {free} free: refused before allocating"
            )

    def _verify(self, manifest: Manifest, buckets: list[torch.Tensor], digest: str, version: int) -> None:
        if self.verify_checksum and digest and checksum(buckets) != digest:
            raise ManifestError(f"checksum mismatch in weight update version {version}")


def _free_bytes(device: torch.device) -> int:
    """Free memory on `device` now (host: available physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_subscriber(  # noqa: PLR0917 - positional signature fixed by the contract with rollout
    learner_address: str,
    replica: str,
    apply: Apply,
    stop: threading.Event,
    config: WeightSyncConfig,
    tls: TLSConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    expected: Mapping[str, ParamSpec] | None = None,
    retry_s: float = 1.0,
) -> None:
    """Receive weight updates from the learner at `learner_address` until `stop` is set.

    Blocking; run it in a thread. `apply(version, named_tensors)` is called for every new
    version (the rollout engine's `load_weights`); `expected` is the receiving model
    (`manifest.param_specs(engine.param_shapes())`), which caps what an announcement may ask
    for. Reconnects with a backoff when the learner is unreachable or drops this replica, and
    when an announcement is refused before allocating. A corrupted update (checksum mismatch)
    raises.
    """
    with channel(learner_address, tls=tls) as chan:
        client = LearnerClient(chan)
        subscriber = Subscriber(
            client,
            replica,
            apply,
            stop,
            device=device,
            expected=expected,
            verify_checksum=config.checksum,
            heartbeat_s=config.heartbeat_s,
        )
        while not stop.is_set():
            try:
                subscriber.run()
            except Refused as exc:
                # Announced through a store every replica can write: refuse it, re-register
                # (a fresh group) rather than allocate or die.
                log.warning("replica %s: weight update refused before allocating: %s", replica, exc)
                stop.wait(retry_s)
            except (grpc.RpcError, dist.DistError, Dropped) as exc:
                detail = exc.code() if isinstance(exc, grpc.RpcError) else exc
                log.info("replica %s: weight sync (re)connecting in %.1fs: %s", replica, retry_s, detail)
                stop.wait(retry_s)
