"""Typed client of the LearnerService: replica registration for weight sync, and training status.

Returns plain dataclasses; protobuf stays inside this module. gRPC errors propagate as
`grpc.RpcError` (the caller decides whether to retry).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from asyncopd.v1 import learner_pb2 as pb
from asyncopd.v1 import learner_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class ReplicaRegistration:
    """How a registered replica joins the weight broadcast (see asyncopd.weightsync)."""

    store_host: str
    store_port: int
    membership_epoch: int
    rank: int
    world_size: int
    version: int
    backend: str
    registration: int
    timeout_s: float


@dataclass(frozen=True)
class LearnerStatus:
    """Training progress as the learner reports it."""

    version: int
    steps_total: int
    last_loss: float
    train_tokens_per_second: float
    replicas: int
    finished: bool


class LearnerClient:
    """RegisterReplica / UnregisterReplica / Status over one channel."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 10.0) -> None:
        self._stub = pb_grpc.LearnerServiceStub(channel)
        self._timeout = timeout_s

    def register(
        self, replica: str, address: str = "", collective: bool = True, device: str = "cpu"
    ) -> ReplicaRegistration:
        r = self._stub.RegisterReplica(
            pb.RegisterReplicaRequest(replica=replica, address=address, collective=collective, device=device),
            timeout=self._timeout,
        )
        return ReplicaRegistration(
            store_host=r.store_host,
            store_port=r.store_port,
            membership_epoch=r.membership_epoch,
            rank=r.rank,
            world_size=r.world_size,
            version=r.version,
            backend=r.backend,
            registration=r.registration,
            timeout_s=r.timeout_s,
        )

    def unregister(self, replica: str, registration: int = 0) -> None:
        self._stub.UnregisterReplica(
            pb.UnregisterReplicaRequest(replica=replica, registration=registration), timeout=self._timeout
        )

    def status(self) -> LearnerStatus:
        r = self._stub.Status(pb.LearnerStatusRequest(), timeout=self._timeout)
        return LearnerStatus(
            version=r.version,
            steps_total=r.steps_total,
            last_loss=r.last_loss,
            train_tokens_per_second=r.train_tokens_per_second,
            replicas=r.replicas,
            finished=r.finished,
        )
