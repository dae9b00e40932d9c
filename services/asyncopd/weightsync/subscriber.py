"""A rollout replica's side of weight sync: register, join each membership epoch, receive updates.

`run_subscriber(...)` blocks (run it in a thread) until `stop` is set. It registers with the
learner over gRPC, follows its group assignments through the learner's store (the protocol is in
`asyncopd.weightsync.membership` and `.collective`), receives every update's buckets by broadcast
and hands `(version, stream)` to `apply` — the engine's `load_weights` — while they arrive: the
stream (`asyncopd.weightsync.receive.WeightStream`) receives the next bucket into one of two
persistent buffers while the engine loads the previous one, so a replica never holds more than
two buckets besides its model. The tensors it yields are views into those buffers, valid until
the engine moves two buckets on: `apply` must copy them (load them), not keep them. Then it acks.

Every assignment, go and command read from the store must carry the MAC of the run's weight-sync
key (`asyncopd.weightsync.groups.Signer`): one written by a client without the key is refused
and never acted on. The store is still writable by every holder of the key, so an update's
manifest is checked before a byte is allocated for it: consistent (`Manifest.validate`) and,
given the receiving model (`expected`: names, shapes, optionally dtypes), holding only the
model's own tensors — so it never asks for more than the model's size; without a model, receive
buffers larger than the receive device's free memory are refused. A refused announcement
is a `ManifestError`: the subscriber registers again instead of allocating. An update
whose version the replica already holds (a rebuilt group re-sending it) is received and acked,
not re-applied. With checksums on, every bucket is checked before its tensors reach `apply`; a
mismatch raises (the buckets before it are already loaded: the replica stops).

With delta sync on the learner (commands say `keep_base`), the replica keeps the decoded buckets
of the version it applied (`receive.BaseBuckets`) and decodes each delta over them. A delta names
the version it was encoded against (`delta.base`); the learner sends one only to a group whose
members all acked that version, and the replica checks it too: a delta against anything but the
exact version and layout it holds is received (the group's broadcast completes) but neither
decoded nor applied nor acked, and the replica registers again (`Refused`), so it comes back as a
late joiner and gets the dense snapshot — it never applies a delta to weights it does not have.

If the learner goes away (its store refuses connections) or drops this replica, the subscriber
registers again with a backoff, so a restarted learner picks its replicas back up.

It knows the store protocol and torch.distributed; it knows nothing of engines or generation.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
import torch
import torch.distributed as dist

from asyncopd.config.security import TLSConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.weightsync import groups
from asyncopd.weightsync.delta import ENCODINGS, Encoding, payload_bytes
from asyncopd.weightsync.manifest import Manifest, ManifestError, ParamSpec
from asyncopd.weightsync.receive import Abandoned, BaseBuckets, Incomplete, Land, ReceiveBuffers, WeightStream
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
        signer: groups.Signer | None = None,
    ) -> None:
        self.client = client
        # Verifies every assignment, go and command (a value written without the key is refused
        # and never acted on) and signs this replica's ready and done keys.
        self.signer = signer if signer is not None else groups.Signer.from_env()
        self.heartbeat_s = heartbeat_s
        self.replica = replica
        self.apply = apply
        self.stop = stop
        self.device = torch.device(device)
        self.expected = expected
        self.verify_checksum = verify_checksum
        self.version = -1  # last applied version
        self.updates = 0  # updates applied
        self.buffers: ReceiveBuffers | None = None  # two bucket buffers, kept across updates and groups
        self._manifest: Manifest | None = None  # the last accepted layout (its JSON is compared first)
        self.base: BaseBuckets | None = None  # the applied version's buckets, kept while the learner sends deltas
        self.refused_deltas = 0  # deltas against a version this replica did not hold (each made it register again)

    def run(self) -> None:
        """Register and follow assignments until `stop` (returns) or dropped / learner gone (raises)."""
        reg = self.client.register(self.replica, collective=True, device=str(self.device))
        # A new registration may be with a restarted learner that resumed from an older
        # checkpoint: whatever it sends first is applied, even at a version seen before.
        self.version = -1
        if self.base is not None:
            self.base.version = -1  # its versions are another learner's: no delta applies to them
        store = groups.connect_store(reg.store_host, reg.store_port, reg.timeout_s)
        # Its own connection: it sleeps in the store until the next command is written.
        waiter = groups.KeyWaiter(groups.connect_store(reg.store_host, reg.store_port, reg.timeout_s))
        log.info("replica %s registered with the learner (registration %d)", self.replica, reg.registration)
        beating = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(reg, beating), name=f"weightsync-heartbeat-{self.replica}", daemon=True
        )
        beat.start()
        try:
            k = 0
            while not self.stop.is_set():
                assignment = self.signer.poll_json(
                    store, groups.assign_key(self.replica, reg.registration, k), self.stop
                )
                if assignment is None:
                    return
                k += 1
                if assignment.get("dropped"):
                    raise Dropped(str(assignment.get("reason", "dropped by the learner")))
                self._join(store, waiter, assignment, reg.timeout_s)
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

    def _join(
        self, store: dist.Store, waiter: groups.KeyWaiter, assignment: dict[str, object], timeout_s: float
    ) -> None:
        epoch, rank, world = int(assignment["epoch"]), int(assignment["rank"]), int(assignment["world"])  # type: ignore[call-overload]
        backend = groups.resolve_backend(str(assignment["backend"]), self.device)
        if backend == "nccl":
            torch.cuda.set_device(self.device)  # NCCL binds the group to the current device
        self.signer.put(store, groups.ready_key(epoch, rank), "1")
        go = self.signer.poll(store, groups.go_key(epoch), self.stop, timeout_s=2 * timeout_s)
        if go != "build":
            return
        try:
            pg = groups.make_group(store, epoch, rank=rank, world=world, backend=backend, timeout_s=timeout_s)
        except (dist.DistError, RuntimeError) as exc:
            log.warning("replica %s: group of epoch %d did not form: %s", self.replica, epoch, exc)
            return
        log.info("replica %s joined membership epoch %d as rank %d of %d", self.replica, epoch, rank, world)
        device = groups.bucket_device(backend, self.device)
        if self.buffers is None or self.buffers.device != device:
            self.buffers = ReceiveBuffers(device)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            # An update's broadcast cannot start before every member posted its receives: the
            # command is waited for in the store (seen the moment it is written), not polled.
            command = self.signer.poll_json(store, groups.command_key(epoch, seq), self.stop, waiter=waiter)
            if command is None:
                return
            if command["op"] != "update":
                return  # rebuild: the next assignment says where to go
            if not self._update(store, pg, epoch, rank, seq, command, timeout_s):
                return

    def _update(  # noqa: PLR0917 - the epoch's state, passed down from _join
        self,
        store: dist.Store,
        pg: groups.Group,
        epoch: int,
        rank: int,
        seq: int,
        command: dict[str, Any],
        timeout_s: float,
    ) -> bool:
        """Receive command `seq` (streamed into `apply` when its version is new), then ack it;
        False when the broadcast was abandoned or failed (wait for the next assignment)."""
        version = int(command["version"])
        assert self.buffers is not None
        try:
            text = str(command["manifest"])
            digests = [str(d) for d in command.get("checksums", [])] if self.verify_checksum else []
            if self._manifest is not None and text == self._manifest.json_text:
                manifest = self._manifest  # the same layout as last time: checked already
            else:
                manifest = Manifest.from_json(text)
                self._check_size(manifest, self.buffers)  # before allocating what it announces
                self._manifest = manifest
            if digests and len(digests) != len(manifest.bucket_sizes):
                raise ManifestError(f"{len(digests)} bucket checksums for {len(manifest.bucket_sizes)} buckets")
            keep = bool(command.get("keep_base"))
            delta = _delta_of(command.get("delta"), manifest)
        except (ManifestError, KeyError, TypeError, ValueError) as exc:
            raise Refused(f"refused manifest: {exc}") from exc
        if not keep:
            self.base = None  # the learner sends no deltas: free the copy
        # The learner announces a rebuild as the next command: then this broadcast cannot
        # complete (a member died or froze), so stop waiting for it instead of timing out.
        rebuild = groups.command_key(epoch, seq + 1)

        def abandon() -> bool:
            return self.stop.is_set() or (bool(store.check([rebuild])) and self.signer.present(store, rebuild))

        to = command.get("to")
        if to is not None and rank not in to:
            # A catch-up for late joiners: this member holds the version already.
            store.add(groups.ack_key(epoch, seq), 1)
            return True
        tags = itertools.count()

        def receive(t: torch.Tensor) -> dist.Work:
            if to is not None:
                return groups.recv(pg, t, next(tags))
            return groups.post(pg, t, timeout_s)

        fresh = version > self.version
        land: Land | None = None
        refuse = ""
        if fresh and keep and (self.base is None or self.base.device != self.buffers.device):
            self.base = BaseBuckets(self.buffers.device)
        base = self.base
        if fresh and delta is not None and (base is None or not base.holds(delta[0], manifest)):
            # The explicit version check: never decode a delta over weights this replica lacks.
            held = base.version if base is not None else "no base"
            refuse = f"a delta of version {version} against version {delta[0]}, this replica holds {held}"
        elif fresh and keep:
            assert base is not None
            base.begin(manifest)
            dense: tuple[Encoding, int] = ("dense", 0)
            forms = delta[1] if delta is not None else [dense] * len(manifest.bucket_sizes)

            def land(k: int, payload: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
                assert base is not None
                return base.land(k, payload, *forms[k])

        sizes = None if delta is None else delta[2]
        stream = WeightStream(
            manifest,
            self.buffers,
            receive=receive,
            wait=lambda work: groups.watch([work], timeout_s, abandon=abandon),
            # A delta's digests are of the decoded buckets: checked only where it is decoded.
            digests=digests if delta is None or land is not None else [],
            payload_sizes=sizes,
            land=land,
        )
        error: Exception | None = None
        try:
            if fresh and not refuse:
                try:
                    self.apply(version, stream)
                except Exception as exc:  # re-raised below, once the group is consistent
                    if stream.failure is not None:
                        raise stream.failure from exc
                    error = exc
            stream.drain()
        except (Abandoned, Incomplete) as exc:
            log.info("replica %s: broadcast of version %d abandoned for a rebuild (%s)", self.replica, version, exc)
            groups.retire(pg, timeout_s)
            return False
        except (dist.DistError, RuntimeError) as exc:
            log.warning(
                "replica %s: broadcast of version %d failed (%s); waiting for a rebuild", self.replica, version, exc
            )
            return False
        if refuse:
            self.refused_deltas += 1
            raise Refused(f"{refuse}: registering again for a full update")
        acks = int(store.add(groups.ack_key(epoch, seq), 1))
        if acks >= int(command.get("members", 0) or 1 << 30):
            self.signer.put(store, groups.done_key(epoch, seq), "1")  # the last ack: wakes the learner at once
        if error is not None:
            raise error
        if fresh:
            self.version = version
            self.updates += 1
            if land is not None and self.base is not None:
                self.base.finish(version)
        return True

    def _check_size(self, manifest: Manifest, buffers: ReceiveBuffers) -> None:
        if self.expected is not None:
            try:
                manifest.check_fits(self.expected)
            except ManifestError as exc:
                raise Refused(str(exc)) from exc
            return
        grow = 2 * max(max(manifest.bucket_sizes, default=0) - buffers.capacity, 0)
        if self.base is not None:  # a learner sending deltas: the base takes a copy of the update too
            grow += manifest.total_bytes
        free = _free_bytes(buffers.device)
        if grow > free:
            raise Refused(
                f"update needs {grow} more bytes of receive buffers, {buffers.device} has {free} free: "
                "refused before allocating"
            )


def _delta_of(announced: object, manifest: Manifest) -> tuple[int, list[tuple[Encoding, int]], list[int]] | None:
    """A command's `delta` as (base version, per bucket (encoding, changed words), payload bytes);
    raises ManifestError when it does not fit the manifest's buckets (nothing is received then)."""
    if announced is None:
        return None
    if not isinstance(announced, dict):
        raise ManifestError(f"delta announcement is not an object: {announced!r}")
    base = int(announced["base"])
    raw = announced["buckets"]
    if not isinstance(raw, list) or len(raw) != len(manifest.bucket_sizes):
        raise ManifestError(f"delta names {len(raw)} buckets, the manifest has {len(manifest.bucket_sizes)}")
    forms: list[tuple[Encoding, int]] = []
    sizes: list[int] = []
    for k, (entry, size) in enumerate(zip(raw, manifest.bucket_sizes, strict=True)):
        encoding, changed = str(entry[0]), int(entry[1])
        if encoding not in ENCODINGS or not 0 <= changed <= size // 2:
            raise ManifestError(f"bucket {k}: delta {entry!r} does not fit a bucket of {size} bytes")
        form: Encoding = encoding  # type: ignore[assignment]
        nbytes = payload_bytes(form, size // 2, changed)
        if nbytes > size:
            raise ManifestError(f"bucket {k}: a {encoding} delta of {nbytes} bytes is larger than the bucket")
        forms.append((form, changed))
        sizes.append(nbytes)
    return base, forms, sizes


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
    when an announcement is refused before allocating or a delta names a version this replica
    does not hold (it comes back as a late joiner: dense). A corrupted update (checksum mismatch)
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
                log.warning("replica %s: weight update refused, registering again: %s", replica, exc)
                stop.wait(retry_s)
            except (grpc.RpcError, dist.DistError, Dropped) as exc:
                detail = exc.code() if isinstance(exc, grpc.RpcError) else exc
                log.info("replica %s: weight sync (re)connecting in %.1fs: %s", replica, retry_s, detail)
                stop.wait(retry_s)
