"""Process groups and the rendezvous store of the weight broadcast, without `init_process_group`.

The learner hosts a `TCPStore`; every membership epoch gets its own gloo or NCCL group built
from `PrefixStore("ws/g<epoch>/pg", store)`, so a group can be thrown away and rebuilt when
replicas join or leave without touching torch's global default group. This module also holds
the store key scheme both sides share, and the small waiting helpers around it.

It knows torch.distributed; it knows nothing of gRPC, models or the training loop.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from asyncopd.config.weightsync import WEIGHTSYNC_KEY_ENV

log = logging.getLogger(__name__)

Backend = Literal["gloo", "nccl"]
# The group object both backends give (ProcessGroupNCCL has the same broadcast/wait API; it is
# absent from CPU builds of torch, so the type names the gloo class).
Group = dist.ProcessGroupGloo


def resolve_backend(configured: str, device: torch.device | str) -> Backend:
    """auto -> nccl on a CUDA device, gloo otherwise; an explicit choice must fit the device."""
    kind = torch.device(device).type
    if configured == "auto":
        return "nccl" if kind == "cuda" else "gloo"
    if configured == "nccl" and kind != "cuda":
        raise ValueError(f"weightsync.backend=nccl needs a CUDA device, the learner runs on {device!s}")
    if configured not in ("gloo", "nccl"):
        raise ValueError(f"weightsync.backend must be auto, gloo or nccl, got {configured!r}")
    return configured  # type: ignore[return-value]


def bucket_device(backend: Backend, device: torch.device | str) -> torch.device:
    """Where broadcast buffers live: on the GPU for NCCL, in host memory for gloo."""
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The learner's store (master); port 0 binds a free port (read it back from `.port`)."""
    return dist.TCPStore(
        host, port, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False, use_libuv=True
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A replica's client connection to the learner's store."""
    return dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def make_group(store: dist.Store, epoch: int, *, rank: int, world: int, backend: Backend, timeout_s: float) -> Group:
    """Connect the group of one membership epoch (blocks until all `world` ranks joined or timeout)."""
    prefixed = dist.PrefixStore(f"ws/g{epoch}/pg", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        # Only CUDA builds of torch have NCCL (the name does not exist on the CPU wheel).
        nccl: Any = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("weight sync backend nccl needs a CUDA build of torch")
        options = nccl.Options()
        options._timeout = timeout
        group: Group = nccl(prefixed, rank, world, options)
        return group
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # absent from the stubs
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_default_device()]
    # Two worker threads on every rank. The learner's: a replica that is late to post bucket k
    # does not hold bucket k + 1 back from the others. A replica's: in gloo's broadcast tree a
    # replica that forwards bucket k to others still receives k + 1 meanwhile. (Replicas had one,
    # so that bucket k completed while k + 1 moved; measured side by side, two were as fast or
    # faster everywhere: 64 MiB ratio 0.70-0.75 -> 0.82-0.83 at R = 1, 1 GiB ~8 % faster at R = 4.)
    options._threads = 2
    return dist.ProcessGroupGloo(prefixed, rank, world, options)


# Groups retired to daemon threads, and the guard that keeps their destruction away from
# interpreter exit (see `retire` and `_before_exit`).
_exiting = threading.Event()
_retire_lock = threading.Lock()
_destroying: dict[threading.Thread, float] = {}  # thread -> how long its destruction may take (s)
_EXIT_GRACE_S = 10.0


def retire(group: Group | None, keep_s: float) -> None:
    """Let go of a group that may still have an abandoned collective in flight.

    Destroying a process group waits for its in-flight work, i.e. for an abandoned broadcast's
    full timeout. The caller drops its own references and hands the group here: a daemon thread
    keeps the last one for `keep_s` (the collective's timeout) and the destructor then blocks
    that thread, not the weight-sync path.

    The destructor runs with the GIL released; if the interpreter finalizes meanwhile, the
    thread is ended when it takes the GIL back, inside C++, and the process aborts ("terminate
    called without an active exception"). So once the process is exiting no destruction starts
    (the group is kept until the process is gone), and exit waits for those already running.
    """
    if group is None:
        return
    holder = [group]

    def hold() -> None:
        me = threading.current_thread()
        if not _exiting.wait(keep_s + 1.0):
            with _retire_lock:
                destroy = not _exiting.is_set()
                if destroy:
                    _destroying[me] = keep_s + _EXIT_GRACE_S
            if destroy:
                try:
                    holder.clear()
                finally:
                    with _retire_lock:
                        _destroying.pop(me, None)
                return
        # Exiting: never destroy. Blocking forever keeps this frame (and the group) alive; the
        # interpreter does not free a daemon thread's frame, the process's end frees the group.
        threading.Event().wait()

    threading.Thread(target=hold, name="weightsync-retired-group", daemon=True).start()


@atexit.register
def _before_exit() -> None:
    """Runs before the interpreter finalizes: stop new destructions, wait for running ones.

    A destruction that starts after `keep_s + 1` has no collective left in flight and only
    closes connections; `_EXIT_GRACE_S` past `keep_s` bounds the wait all the same.
    """
    with _retire_lock:
        _exiting.set()
        running = list(_destroying.items())
    for thread, bound_s in running:
        thread.join(timeout=bound_s)


def post(group: Group, tensor: torch.Tensor, timeout_s: float) -> dist.Work:
    """Enqueue a broadcast of `tensor` from rank 0 (the learner) and return at once; see `watch`."""
    # the (tensor, root, timeout) overload exists at run time; torch's stubs list only the other
    work: dist.Work = group.broadcast(tensor, 0, timedelta(seconds=timeout_s))  # type: ignore[attr-defined]
    return work


def send(group: Group, tensor: torch.Tensor, rank: int, tag: int) -> dist.Work:
    """Enqueue a point-to-point send of `tensor` from the learner to `rank` (a late joiner's catch-up)."""
    return group.send([tensor], rank, tag)  # type: ignore[attr-defined]  # a Backend method; the stubs lack it


def recv(group: Group, tensor: torch.Tensor, tag: int) -> dist.Work:
    """Enqueue the receive of a point-to-point send from the learner (rank 0) into `tensor`."""
    return group.recv([tensor], 0, tag)  # type: ignore[attr-defined]


def watch(
    works: Sequence[dist.Work],
    timeout_s: float,
    abandon: Callable[[], bool] | None = None,
    check_every_s: float = 0.05,
) -> bool:
    """Wait until every one of `works` completed; raises if one failed or the timeout passed.

    With `abandon`, the collectives are watched instead of waited on: when `abandon()` turns
    true (checked every `check_every_s`) the call returns False at once and leaves them to fail
    on their own later (the group is not used again). That is how a peer stuck in a broadcast
    that can no longer complete — a member died or froze — gets out before its timeout.
    The wait blocks on the works' completion callbacks (no spinning: on a busy CPU a spinning
    waiter takes the core the collective's own threads need). Returns True when all completed.
    """
    timeout = timedelta(seconds=timeout_s)
    if abandon is None or not works:
        for work in works:
            work.wait(timeout)
        return True
    futures, waited = [], []
    for work in works:
        try:
            futures.append((work, work.get_future()))
        except RuntimeError:
            # gloo's point-to-point works have no future (and report completion only from
            # `wait`, which must be called once): a daemon thread waits on each.
            waited.append(work)
    done = threading.Event()
    left = [len(works)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(_: object = None) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    def wait_one(work: dist.Work) -> None:
        try:
            work.wait(timeout)
        except (dist.DistError, RuntimeError) as exc:
            errors.append(exc)
        finally:
            one()

    for _, future in futures:
        future.add_done_callback(one)
    for work in waited:
        threading.Thread(target=wait_one, args=(work,), name="weightsync-p2p-wait", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(check_every_s):
        if abandon():
            return False
        if time.monotonic() >= deadline:
            raise RuntimeError(f"weight sync: {left[0]} of {len(works)} transfers not done within {timeout_s:.1f}s")
    if errors:
        raise errors[0]
    for work, _ in futures:
        work.wait(timeout)  # raises the error of a failed collective
    return True


def broadcast(
    group: Group,
    tensor: torch.Tensor,
    timeout_s: float,
    abandon: Callable[[], bool] | None = None,
    check_every_s: float = 0.05,
) -> bool:
    """One broadcast from rank 0, waited on (`watch`); True when it completed, False when abandoned."""
    return watch([post(group, tensor, timeout_s)], timeout_s, abandon, check_every_s)


# ---- store keys (the protocol both sides share) -------------------------------------------


def assign_key(replica: str, registration: int, k: int) -> str:
    """The k-th group assignment of one registration: {"epoch","rank","world","backend"} or {"dropped"}."""
    return f"ws/assign/{replica}/{registration}/{k}"


def heartbeat_key(replica: str, registration: int) -> str:
    """Counter one registration's heartbeat thread bumps every `weightsync.heartbeat_s`."""
    return f"ws/hb/{replica}/{registration}"


def ready_key(epoch: int, rank: int) -> str:
    return f"ws/g{epoch}/ready/{rank}"


def go_key(epoch: int) -> str:
    """'build' once every rank is ready, 'abort' when some never came (then wait for the next assignment)."""
    return f"ws/g{epoch}/go"


def command_key(epoch: int, seq: int) -> str:
    """The seq-th command of an epoch's group: {"op": "update", ...} or {"op": "rebuild"}."""
    return f"ws/g{epoch}/cmd/{seq}"


def ack_key(epoch: int, seq: int) -> str:
    """Counter of replicas that received and verified command seq."""
    return f"ws/g{epoch}/ack/{seq}"


def done_key(epoch: int, seq: int) -> str:
    """Set by the replica whose ack made the count reach the group's size (the learner waits on it)."""
    return f"ws/g{epoch}/done/{seq}"


class KeyWaiter:
    """Wakes the moment a store key is written, on a store connection of its own.

    `TCPStore.wait` blocks inside the store until the key exists: no polling and no round trips
    while idle, and the waiter learns of the key as soon as the store does. It cannot be
    interrupted, and a wait that times out makes torch log two C++ warnings, so it runs in a
    daemon thread on this connection (the caller's own connection stays free for its other
    requests) with a long timeout, and the caller waits on an event that also honours `stop`.
    A wait left behind by a stop ends when its key is written (a replica that stops unregisters,
    and the learner then writes its epoch's next command, a rebuild), when the store goes away,
    or with the process.
    """

    def __init__(self, store: dist.Store, block_s: float = 3600.0) -> None:
        self._store = store
        self._block = timedelta(seconds=block_s)
        self._thread: threading.Thread | None = None
        self._name = ""

    @property
    def pending(self) -> str | None:
        """The key a wait left behind is still blocked on (None: the waiter is free)."""
        return self._name if self._thread is not None and self._thread.is_alive() else None

    def release(self, store: dist.Store, join_s: float = 1.0) -> bool:
        """End a wait left behind by writing its key (an empty value) through `store`, another
        connection (this one is blocked in the wait); True when the waiter is free again. For keys
        nobody reads once the wait was given up (a done key of an abandoned update)."""
        name, thread = self.pending, self._thread
        if name is None or thread is None:
            return True
        store.set(name, "")
        thread.join(join_s)
        return not thread.is_alive()

    def wait(
        self,
        name: str,
        stop: threading.Event,
        check_s: float = 0.05,
        abandon: Callable[[], bool] | None = None,
    ) -> bool:
        """True once `name` exists (verify it: anyone can write a key); False when `stop` is set
        or `abandon()` (asked every `check_s`) turns true first. Raises what the store raised when
        it went away."""
        if stop.is_set():
            return False
        if self.pending is not None:
            raise RuntimeError(f"store key {name}: this waiter's previous wait is still blocked")
        written = threading.Event()
        failure: list[BaseException] = []

        def block() -> None:
            try:
                while True:
                    try:
                        self._store.wait([name], self._block)
                        return
                    except dist.DistStoreError:
                        # A wait that timed out (the store still answers) goes on; a store that
                        # went away raises from `check` and ends it.
                        if self._store.check([name]):
                            return
            except (dist.DistError, RuntimeError) as exc:
                failure.append(exc)
            finally:
                written.set()

        self._name = name
        self._thread = threading.Thread(target=block, name=f"weightsync-wait-{name}", daemon=True)
        self._thread.start()
        while not written.wait(check_s):
            if stop.is_set() or (abandon is not None and abandon()):
                return False
        if failure:
            raise failure[0]
        return True


# ---- authenticated values ------------------------------------------------------------------
#
# Anyone who reaches the store's port can write any key. Every value the two sides act on
# (assignments, go, ready, commands with their manifest, done) is therefore written as
# {"v": <payload>, "mac": hex(HMAC-SHA256(key, key_name + "\0" + payload))} with a key both
# sides read from the environment (`KEY_ENV`; the chart mounts it from a Secret, the local
# launcher makes one per run). The key name is inside the MAC: a value cannot be replayed under
# another key (the names carry the epoch, seq and registration). A value that does not verify
# is refused (`StoreAuthError`), counted and treated as absent; the real writer's `set` later
# replaces it. Counters bumped with `add` (heartbeats, acks) cannot carry a MAC: a forged
# heartbeat keeps a dead replica in the group until `timeout_s`, a forged ack makes the learner
# believe an update landed early — it can never make a replica load anything, whose manifest
# and bucket checksums come from the signed command. torch's own group rendezvous keys
# (ws/g<epoch>/pg/...) are unsigned too: with `weightsync.checksum` a replica verifies every
# bucket against the signed command's digests.

KEY_ENV = WEIGHTSYNC_KEY_ENV
_warned_unsigned = threading.Event()


class StoreAuthError(ValueError):
    """A store value whose MAC is missing or wrong (written without the key, or moved from another key)."""


def mac(secret: bytes, name: str, payload: str) -> str:
    return hmac.new(secret, name.encode() + b"\0" + payload.encode(), hashlib.sha256).hexdigest()


class Signer:
    """Writes and verifies the store's authenticated values with one key (None: unsigned, local toy runs)."""

    def __init__(self, secret: bytes | str | None) -> None:
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.refused = 0  # values refused (bad or missing MAC), for logs and tests
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Signer:
        """The key in `ASYNCOPD_WEIGHTSYNC_KEY`; unset or empty: unsigned (warned once per process)."""
        secret = os.environ.get(KEY_ENV, "")
        if not secret and not _warned_unsigned.is_set():
            _warned_unsigned.set()
            log.warning(
                "weight sync: %s is not set, the store's assignments and commands are unsigned "
                "(anyone who reaches the store port can steer the replicas)",
                KEY_ENV,
            )
        return cls(secret or None)

    def encode(self, name: str, payload: str) -> str:
        return json.dumps({"v": payload, "mac": mac(self.secret, name, payload) if self.secret else ""})

    def decode(self, name: str, raw: str | bytes) -> str:
        """The payload of `raw` read from key `name`; raises `StoreAuthError` when it does not verify."""
        try:
            value = json.loads(raw)
            payload, tag = value["v"], value["mac"]
            if not isinstance(payload, str) or not isinstance(tag, str):
                raise TypeError("not strings")
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreAuthError(f"store key {name}: not a signed value ({exc})") from exc
        if self.secret is not None and not hmac.compare_digest(tag, mac(self.secret, name, payload)):
            raise StoreAuthError(f"store key {name}: MAC does not verify (written without the key, or moved)")
        return payload

    def put(self, store: dist.Store, name: str, payload: str) -> None:
        store.set(name, self.encode(name, payload))

    def put_json(self, store: dist.Store, name: str, value: dict[str, Any]) -> None:
        self.put(store, name, json.dumps(value, separators=(",", ":")))

    def read(self, store: dist.Store, name: str, *, written: bool = False) -> str | None:
        """The verified payload under `name`; None when absent or refused (logged and counted).
        `written`: the caller saw the key exist (a `KeyWaiter` woke; keys are never deleted), so
        no `check` round trip first."""
        if not written and not store.check([name]):
            return None
        try:
            return self.decode(name, store.get(name))
        except StoreAuthError as exc:
            with self._lock:
                self.refused += 1
                first = self.refused == 1
            (log.warning if first else log.debug)("weight sync: refused a store value: %s", exc)
            return None

    def present(self, store: dist.Store, name: str, *, written: bool = False) -> bool:
        """Whether `name` holds a value that verifies (`written`: see `read`)."""
        return self.read(store, name, written=written) is not None

    def poll(
        self,
        store: dist.Store,
        name: str,
        stop: threading.Event | None = None,
        timeout_s: float | None = None,
        interval_s: float = 0.02,
        *,
        waiter: KeyWaiter | None = None,
    ) -> str | None:
        """The verified payload once `name` holds one; None when `stop` is set or `timeout_s` passes first.

        Polls `check` (one round trip) rather than blocking in `get`, so a stop request or a
        deadline is honoured within `interval_s`; a value that does not verify is refused and
        the poll goes on (the real writer replaces it); a store that went away raises. With a
        `waiter` (and a `stop`, no `timeout_s`) it first sleeps in the store until the key is
        written instead: seen at once, and no round trips while it is absent.
        """
        woke = False  # the waiter saw the key written: the first read needs no `check`
        if waiter is not None and stop is not None and timeout_s is None:
            if not waiter.wait(name, stop):
                return None
            woke = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            payload = self.read(store, name, written=woke)
            woke = False
            if payload is not None:
                return payload
            if stop is not None and stop.is_set():
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval_s)

    def poll_json(
        self,
        store: dist.Store,
        name: str,
        stop: threading.Event | None = None,
        timeout_s: float | None = None,
        interval_s: float = 0.02,
        *,
        waiter: KeyWaiter | None = None,
    ) -> dict[str, Any] | None:
        """`poll`, parsed as a JSON object (a signed payload that is not one is refused as well)."""
        payload = self.poll(store, name, stop, timeout_s, interval_s, waiter=waiter)
        if payload is None:
            return None
        value = json.loads(payload)
        if not isinstance(value, dict):
            raise StoreAuthError(f"store key {name}: signed payload is not a JSON object")
        return value
