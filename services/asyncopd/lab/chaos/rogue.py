"""The `rogue-client` fault: the attacks of issue #20 (item 2), fired at a live run's services.

A rogue pod reaches the services without the learner's fencing epoch and without a role of its
own (the local launcher serves without TLS identities, so every attack here must be refused by
what the services check whatever the caller: fencing, validation, the caller's own address):

  pull-2**53         PullBatch(learner_version=2**53): would publish that version and lock the
                     real learner out
  publish-finished   PublishVersion(finished=true) at the published version: would end admission
  push-version-1e9   PushWeights to a rollout replica at version 10**9 (every parameter, zeros)
  push-nan           PushWeights at the next version with NaN values
  push-partial       PushWeights at the next version whose one chunk covers half a parameter
  register-foreign   RegisterReplica(collective=false, address=<a foreign host>): the learner
                     would stream the weights there (only with TLS identities, see below)

It speaks the wire through raw stubs: the typed clients (`asyncopd.wire`) refuse to build most of
these requests. Each attack reports the gRPC status it got; refused = PERMISSION_DENIED, UNAUTHENTICATED,
INVALID_ARGUMENT or FAILED_PRECONDITION. An accepted attack is the fault's error (the run may be
damaged by it; that is what the fault is for). The attacks refused by who the caller is
(register-foreign; name reuse of a live replica) need the per-role TLS identities the chart
issues: without TLS the services run with authorisation off (they say so at start), a rogue on
loopback is indistinguishable from a replica, and those attacks are reported as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from asyncopd.v1 import cache_pb2, cache_pb2_grpc, learner_pb2, learner_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from asyncopd.wire.tensors import encode

REFUSED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


@dataclass(frozen=True)
class AttackResult:
    attack: str
    code: str  # the gRPC status name ("OK" when accepted)
    refused: bool
    message: str = ""


def _attempt(name: str, call: Callable[[], object]) -> AttackResult:
    try:
        call()
    except grpc.RpcError as err:
        code = err.code()
        return AttackResult(name, code.name, code in REFUSED, (err.details() or "")[:160])
    return AttackResult(name, "OK", False, "accepted")


def _push(stub: rollout_pb2_grpc.RolloutServiceStub, chunks: list[rollout_pb2.WeightChunk]) -> object:
    return stub.PushWeights(iter(chunks), timeout=30.0)


def attack(
    cache_address: str,
    learner_address: str,
    rollout_address: str,
    params: list[tuple[str, tuple[int, ...]]],
    published: int,
    *,
    identities: bool = False,
) -> list[AttackResult]:
    """Fire every attack once (plaintext channels, no epoch, no identity); `params` are the
    student's parameter names and shapes, `published` the learner version published now;
    `identities`: the run serves TLS with per-role identities (else identity attacks are skipped)."""
    results = []
    with grpc.insecure_channel(cache_address) as ch:
        cache = cache_pb2_grpc.CacheServiceStub(ch)
        results.append(
            _attempt(
                "pull-2**53",
                lambda: cache.PullBatch(
                    cache_pb2.PullBatchRequest(learner="rogue", size=1, learner_version=2**53), timeout=10.0
                ),
            )
        )
        results.append(
            _attempt(
                "publish-finished",
                lambda: cache.PublishVersion(
                    cache_pb2.PublishVersionRequest(version=published, finished=True), timeout=10.0
                ),
            )
        )
    with grpc.insecure_channel(rollout_address) as ch:
        rollout = rollout_pb2_grpc.RolloutServiceStub(ch)

        def whole(version: int, fill: float) -> list[rollout_pb2.WeightChunk]:
            return [
                rollout_pb2.WeightChunk(
                    version=version, name=name, tensor=encode(torch.full(shape, fill)), last=i == len(params) - 1
                )
                for i, (name, shape) in enumerate(params)
            ]

        results.append(_attempt("push-version-1e9", lambda: _push(rollout, whole(10**9, 0.0))))
        results.append(_attempt("push-nan", lambda: _push(rollout, whole(published + 1, math.nan))))
        name, shape = max(params, key=lambda p: math.prod(p[1]))
        numel = math.prod(shape)
        half = rollout_pb2.WeightChunk(
            version=published + 1, name=name, tensor=encode(torch.zeros(numel // 2)), offset=0, numel=numel, last=True
        )
        results.append(_attempt("push-partial", lambda: _push(rollout, [half])))
    if not identities:
        results.append(AttackResult("register-foreign", "SKIPPED", True, "no TLS identities: authorisation off"))
        return results
    with grpc.insecure_channel(learner_address) as ch:
        learner = learner_pb2_grpc.LearnerServiceStub(ch)
        results.append(
            _attempt(
                "register-foreign",
                lambda: learner.RegisterReplica(
                    learner_pb2.RegisterReplicaRequest(
                        replica="rogue-0", address="203.0.113.7:50051", collective=False
                    ),
                    timeout=10.0,
                ),
            )
        )
    return results
