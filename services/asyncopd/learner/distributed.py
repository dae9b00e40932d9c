"""The learner over `learner.world_size` processes: FSDP2 sharding, a lockstep plan, rank 0's commands.

Rank 0 is the learner service (gRPC, the cache, checkpoints' small files, weight publishing);
ranks > 0 hold a shard of the weights and optimizer state and do what rank 0 tells them, in
the same order, because every FSDP forward, backward and weight gather is a collective that
all ranks must enter together. The commands (`Op`) go out with `broadcast_object_list`:
`train` carries the pulled samples (every rank collates the whole batch, so the micro-batch
plan is the same everywhere), `gather` starts a bucketed weight gather, `save` a sharded
checkpoint, `stop` ends the followers.

Sharding: `fully_shard` on every decoder layer, then on the model (the root group holds the
embeddings, the final norm and the tied LM head). The trainer's forward does not go through
`model.forward` (it gathers hidden states at response positions and may chunk the LM head),
so the root's hooks run around `opd_run(fn)`, a forward method registered with FSDP: the whole
micro-batch computation runs inside it, the root's parameters stay gathered until its
backward (FSDP keeps the root unsharded after forward) and its gradients are reduce-scattered
in the final post-backward callback.

`Lockstep` turns one process's micro-batch list into this rank's share: micro-batches dealt
round-robin, and a rank without one in a round runs a zero-weight dummy so the collectives
still match. Gradients are summed (not averaged) across ranks, so the update equals the
one-process update on the same batch; metrics are reduced the way the trainer combines
micro-batches (token-weighted sums, min, max).

Local runs: rank 0 (`asyncopd serve learner`) spawns ranks 1..n-1 itself; in a StatefulSet every
pod is started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and none spawns.

It knows torch.distributed and FSDP2; it knows nothing of caches, gRPC or the estimator.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

log = logging.getLogger(__name__)

# The name of the FSDP forward method the trainer calls (see the module doc).
FORWARD_METHOD = "opd_run"
# How long a collective may wait for the other ranks (a dead rank ends the job after this).
TIMEOUT = timedelta(minutes=10)


class Op(StrEnum):
    TRAIN = "train"
    GATHER = "gather"
    SAVE = "save"
    STOP = "stop"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet (torch's env:// variables)."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @classmethod
    def from_env(cls, world_size: int) -> Rendezvous | None:
        """The rendezvous the environment names (RANK, MASTER_ADDR, MASTER_PORT), or None when it names none."""
        if "RANK" not in os.environ:
            return None
        env_world = int(os.environ.get("WORLD_SIZE", world_size))
        if env_world != world_size:
            raise ValueError(f"WORLD_SIZE={env_world} but learner.world_size={world_size}")
        return cls(
            int(os.environ["RANK"]),
            world_size,
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init(rv: Rendezvous, device: str) -> str:
    """Join the default process group (gloo on CPU, NCCL on CUDA); returns the device this rank trains on."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        local = rv.rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{rv.master_addr}:{rv.master_port}",
        rank=rv.rank,
        world_size=rv.world_size,
        timeout=TIMEOUT,
    )
    return device


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"learner.world_size > 1: {type(model).__name__}'s decoder has no `layers` to shard")
    return list(layers)


def shard(model: nn.Module) -> None:
    """FSDP2 in place: every decoder layer, then the model; registers `opd_run` as a forward method."""

    def run(fn: Callable[[], Any]) -> Any:
        return fn()

    setattr(model, FORWARD_METHOD, run)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, FORWARD_METHOD)


class Lockstep:
    """This rank's share of the work and the reductions that make the shares one update."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def assign(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int, bool]]:
        """(start, stop, real) per round: the micro-batches dealt round-robin, a zero-weight dummy
        (the first micro-batch again, real=False) where this rank has none in a round."""
        if not ranges:
            return []
        rounds = math.ceil(len(ranges) / self.world_size)
        out = []
        for r in range(rounds):
            i = r * self.world_size + self.rank
            out.append((*ranges[i], True) if i < len(ranges) else (*ranges[0], False))
        return out

    @property
    def grad_scale(self) -> float:
        """FSDP averages gradients over ranks; each rank's loss is its part of the sum, so undo the mean."""
        return float(self.world_size)

    def sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def reduce_metrics(self, sums: dict[str, float], minimum: set[str], maximum: set[str]) -> dict[str, float]:
        """Combine every rank's partial metrics (sums added, `minimum` by min, `maximum` by max)."""
        names = sorted(sums)
        out: dict[str, float] = {}
        for op, keep in (
            (dist.ReduceOp.SUM, lambda n: n not in minimum and n not in maximum),
            (dist.ReduceOp.MIN, lambda n: n in minimum),
            (dist.ReduceOp.MAX, lambda n: n in maximum),
        ):
            chosen = [n for n in names if keep(n)]
            if not chosen:
                continue
            values = torch.tensor([sums[n] for n in chosen], dtype=torch.float64)
            dist.all_reduce(values, op=op)
            out.update(zip(chosen, values.tolist(), strict=True))
        return out

    def lead(self, op: Op, payload: Any = None) -> None:
        """Rank 0: tell the followers what comes next (no-op on the followers, who are told)."""
        if self.leader:
            dist.broadcast_object_list([(op.value, payload)], src=0)

    @staticmethod
    def receive() -> tuple[Op, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        op, payload = box[0]
        return Op(op), payload


def run(model: nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` inside the sharded model's FSDP forward (plain `fn()` for an unsharded one)."""
    method = getattr(model, FORWARD_METHOD, None)
    return fn() if method is None else method(fn)


def follow(lockstep: Lockstep, handlers: dict[Op, Callable[[Any], object]]) -> None:
    """A follower's life: do what rank 0 says until it says stop."""
    while True:
        op, payload = lockstep.receive()
        if op is Op.STOP:
            return
        handlers[op](payload)


def leave() -> NoReturn:
    """End a rank's process after its work: destroy the process group, flush, and exit 0 without
    interpreter finalisation. Gloo can still hold a joinable worker thread when C++ statics are
    destroyed, which aborts a process whose work is done ("terminate called without an active
    exception", exit -6: seen about one run in ten on two CPU ranks, and reported upstream, e.g.
    pytorch/pytorch#190489); a StatefulSet would count that as a crash."""
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_followers(target: Callable[..., None], args: tuple[Any, ...], world_size: int, port: int) -> list[Any]:
    """Start ranks 1..world_size-1 as fresh processes calling `target(rank, port, *args)`."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, world_size):
        proc = ctx.Process(target=target, args=(rank, port, *args), name=f"learner-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs
