"""Process groups and the rendezvous store of the weight broadcast, without `init_process_group`.

The learner hosts a `TCPStore`; every membership epoch gets its own gloo or NCCL group built
from `PrefixStore("ws/g<epoch>/pg", store)`, so a group can be thrown away and rebuilt when
replicas join or leave without touching torch's global default group. This module also holds
the store key scheme both sides share, and the small polling helpers around it.

It knows torch.distributed; it knows nothing of gRPC, models or the training loop.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

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
    return dist.ProcessGroupGloo(prefixed, rank, world, timeout)


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


def broadcast(
    group: Group,
    tensor: torch.Tensor,
    timeout_s: float,
    abandon: Callable[[], bool] | None = None,
    check_every_s: float = 0.05,
) -> bool:
    """Broadcast from rank 0 (the learner); raises if any peer fails within the timeout.

    With `abandon`, the collective is watched instead of waited on: when `abandon()` turns true
    (checked every `check_every_s`) the call returns False at once and leaves the collective to
    fail on its own later (the group is not used again). That is how a peer stuck in a
    broadcast that can no longer complete — a member died or froze — gets out before its
    timeout. Returns True when the broadcast completed.
    """
    timeout = timedelta(seconds=timeout_s)
    # the (tensor, root, timeout) overload exists at run time; torch's stubs list only the other
    work = group.broadcast(tensor, 0, timeout)  # type: ignore[attr-defined]
    if abandon is not None:
        started = time.monotonic()
        deadline = started + timeout_s
        next_check = started + check_every_s
        while not work.is_completed() and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_check:
                if abandon():
                    return False
                next_check = now + check_every_s
            # Yield without sleeping for the first 10 ms: a bucket over NVLink takes well under
            # a millisecond, and a 1 ms sleep per bucket would double the broadcast.
            time.sleep(0.0 if now - started < 0.01 else 0.001)
    work.wait(timeout)
    return True


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


def put_json(store: dist.Store, key: str, value: dict[str, Any]) -> None:
    store.set(key, json.dumps(value, separators=(",", ":")))


def poll_key(
    store: dist.Store,
    key: str,
    stop: threading.Event | None = None,
    timeout_s: float | None = None,
    interval_s: float = 0.02,
) -> str | None:
    """The key's value once it exists; None when `stop` is set or `timeout_s` passes first.

    Polls `check` (one round trip) rather than blocking in `get`, so a stop request or a
    deadline is honoured within `interval_s`; a store that went away raises.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not store.check([key]):
        if stop is not None and stop.is_set():
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)
    return store.get(key).decode()
