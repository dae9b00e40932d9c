"""LearnerService over gRPC: a thin adapter from requests to the weight transport and the
trainer's progress. It parses, calls domain code, and builds responses; nothing else (it does not
know which weight-sync backend runs).

Registrations are bound to the caller (`wire.authz.caller_of`: its certificate's identities and
its host), which the transport uses as the owner (`weightsync.transport.may_take`: nobody else
takes a live replica's name or unregisters it). With mutual TLS on, a `collective=false`
registration must also name the caller's own host as the address weights are pushed to, so a
pod cannot point the learner's pushes at any other machine.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from asyncopd.v1 import learner_pb2 as pb
from asyncopd.v1 import learner_pb2_grpc as pb_grpc
from asyncopd.weightsync.transport import WeightTransport
from asyncopd.wire.authz import Caller, caller_of
from asyncopd.wire.rpc import PermissionDenied, status_errors

_MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class Progress:
    """What Status reports about training."""

    version: int = 0
    steps_total: int = 0
    last_loss: float = 0.0
    train_tokens_per_second: float = 0.0
    finished: bool = False


class LearnerServicer(pb_grpc.LearnerServiceServicer):
    """Registration of rollout replicas for weight sync, and training status."""

    def __init__(self, weights: WeightTransport, progress: Callable[[], Progress | None]) -> None:
        """`progress()` is None while the learner has not published its first version (UNAVAILABLE)."""
        self._weights = weights
        self._progress = progress

    @status_errors
    def RegisterReplica(  # noqa: N802
        self, request: pb.RegisterReplicaRequest, context: grpc.ServicerContext
    ) -> pb.RegisterReplicaResponse:
        if len(request.replica) > _MAX_NAME_CHARS:  # names become store keys and metric labels
            raise ValueError(f"replica: {len(request.replica)} characters, at most {_MAX_NAME_CHARS}")
        caller = caller_of(context)
        if caller.authenticated and not request.collective and request.address:
            _check_own_address(request.address, caller)
        reg = self._weights.register(
            request.replica,
            device=request.device or "cpu",
            address=request.address,
            collective=request.collective,
            owner=caller.owner,
        )
        return pb.RegisterReplicaResponse(
            store_host=reg.store_host,
            store_port=reg.store_port,
            membership_epoch=reg.membership_epoch,
            rank=-1,  # assigned when the epoch's group forms: read from the store (see registration)
            world_size=reg.world_size,
            version=reg.version,
            backend=reg.backend,
            registration=reg.registration,
            timeout_s=reg.timeout_s,
        )

    @status_errors
    def UnregisterReplica(  # noqa: N802
        self, request: pb.UnregisterReplicaRequest, context: grpc.ServicerContext
    ) -> pb.UnregisterReplicaResponse:
        if not request.replica:
            raise ValueError("replica: must not be empty")
        if request.registration < 0:
            raise ValueError(f"registration: {request.registration} is negative (0 = whatever is current)")
        self._weights.unregister(request.replica, request.registration, owner=caller_of(context).owner)
        return pb.UnregisterReplicaResponse()

    @status_errors
    def Status(self, request: pb.LearnerStatusRequest, context: grpc.ServicerContext) -> pb.LearnerStatusResponse:  # noqa: N802
        p = self._progress()
        if p is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the learner is starting: no version published yet")
        return pb.LearnerStatusResponse(
            version=p.version,
            steps_total=p.steps_total,
            last_loss=p.last_loss,
            train_tokens_per_second=p.train_tokens_per_second,
            replicas=len(self._weights.replicas),
            finished=p.finished,
        )


def _check_own_address(address: str, caller: Caller) -> None:
    """Refuse a push address whose host is not the caller's own (an IP, or a name resolving to it)."""
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.removeprefix("dns:///").strip("[]")
    if host == caller.host:
        return
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        resolved = set()
    if caller.host not in resolved:
        raise PermissionDenied(
            f"address: {address!r} is not the caller's own host ({caller.host}); a replica registers its own "
            "RolloutService for weight pushes"
        )


def add_to_server(servicer: LearnerServicer) -> Callable[[grpc.Server], None]:
    return lambda server: pb_grpc.add_LearnerServiceServicer_to_server(servicer, server)


SERVICE_NAME = "asyncopd.v1.LearnerService"
