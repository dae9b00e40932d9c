"""The RolloutService gRPC servicer: parse and validate, call `RolloutReplica`, build the reply.

Request defaults (proto3 cannot tell 0 from unset): a GenerateRequest without `sampling` uses
the replica's configured sampling; with it, top_p 0 means 1.0 (off) and max_tokens 0 means the
configured max_tokens; temperature must be > 0 unless `greedy`; stop strings and seed are taken
as given.

PushWeights feeds the stream to the one weight receiver, `weightsync.grpc_transport.WeightAssembler`,
against the engine's own parameters, and applies the update atomically only after the whole
stream checked out: every tensor one the engine holds, with its shape and a floating-point
dtype (the engine casts to its own), finite, every element of a sliced tensor written exactly
once, the checksum (when sent) right, and the version within `[held, newest known + 1]`. The
newest known version is the larger of the engine's and, when the servicer is given
`published`, the learner version the cache has published: the learner pushes version V before
it publishes V, so an honest push is never more than one ahead, a replica that fell behind or
joined late still takes the current weights, and a push of version 1e9 is refused (a learner
that jumps its numbering must publish the jump first). A push of the version the engine already
holds (the learner re-sending its latest to a replica it just picked up) is acknowledged with
`tensors=0` and not applied. Anything else is INVALID_ARGUMENT and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc

from asyncopd.records import SupportKind
from asyncopd.rollout.replica import RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.v1 import rollout_pb2, rollout_pb2_grpc
from asyncopd.weightsync.grpc_transport import WeightAssembler
from asyncopd.weightsync.manifest import param_specs
from asyncopd.wire import Limits, WireError, prompt_from_proto, rollout_to_proto
from asyncopd.wire.rpc import status_errors

log = logging.getLogger(__name__)

SERVICE_NAME = "asyncopd.v1.RolloutService"


def sampling_from_proto(msg: rollout_pb2.SamplingParams, default: Sampling) -> Sampling:
    if not msg.greedy and msg.temperature <= 0:
        raise WireError("sampling.temperature: must be > 0 unless sampling.greedy is set")
    if not 0.0 <= msg.top_p <= 1.0:
        raise WireError(f"sampling.top_p: {msg.top_p} must be in (0, 1] (0 = off)")
    if msg.max_tokens < 0:
        raise WireError(f"sampling.max_tokens: {msg.max_tokens} must be >= 1 (0 = the replica's default)")
    return Sampling(
        temperature=msg.temperature if not msg.greedy else 1.0,
        top_p=msg.top_p or 1.0,
        max_tokens=msg.max_tokens or default.max_tokens,
        stop=tuple(msg.stop),
        greedy=msg.greedy,
        seed=msg.seed,
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(
        self, replica: RolloutReplica, default_sampling: Sampling, published: Callable[[], int] | None = None
    ) -> None:
        """`published()`: the learner version the cache has published (widens what PushWeights
        accepts for a replica that fell behind; without it, only the engine's version + 1)."""
        self._replica = replica
        self._default = default_sampling
        self._published = published
        info = replica.engine.info
        self._limits = Limits(vocab_size=info.vocab_size, max_prompt_tokens=info.max_model_len - 1)

    def _learner_version(self) -> int:
        """The cache's published learner version (-1 when not wired or the cache cannot say now:
        then only the engine's own version bounds a push)."""
        if self._published is None:
            return -1
        try:
            return self._published()
        except grpc.RpcError as exc:
            log.warning("PushWeights: the cache's published version is unavailable (%s); bound by the engine's", exc)
            return -1

    @status_errors
    def Generate(  # noqa: N802 - gRPC method name
        self, request: rollout_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.GenerateResponse:
        if not request.prompts:
            raise WireError("prompts: at least one prompt is required")
        prompts = [prompt_from_proto(p, self._limits, f"prompts[{i}]") for i, p in enumerate(request.prompts)]
        sampling = (
            sampling_from_proto(request.sampling, self._default) if request.HasField("sampling") else self._default
        )
        if request.support_kind not in SupportKind._value2member_map_:
            raise WireError(f"support_kind: unknown value {request.support_kind}")
        kind = SupportKind(request.support_kind)
        if kind != SupportKind.NONE and request.support_k < 1:
            raise WireError(f"support_k: {request.support_k} must be >= 1 for {kind.name}")
        rollouts = self._replica.generate(prompts, sampling, kind, request.support_k)
        return rollout_pb2.GenerateResponse(rollouts=[rollout_to_proto(r) for r in rollouts])

    @status_errors
    def Status(  # noqa: N802 - gRPC method name
        self, request: rollout_pb2.RolloutStatusRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutStatusResponse:
        s = self._replica.status()
        return rollout_pb2.RolloutStatusResponse(
            replica=s.replica,
            version=s.version,
            tokens_per_second=s.tokens_per_second,
            generated_tokens=s.generated_tokens,
            engine=s.engine,
            paused=s.paused,
        )

    @status_errors
    def PushWeights(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[rollout_pb2.WeightChunk], context: grpc.ServicerContext
    ) -> rollout_pb2.PushWeightsResponse:
        engine = self._replica.engine
        current = engine.version
        known = max(current, self._learner_version())
        assembler = WeightAssembler(param_specs(engine.param_shapes()), current=current, newest=known + 1)
        for chunk in request_iterator:
            assembler.add(chunk)
        version, named = assembler.finish()
        if version == current:
            return rollout_pb2.PushWeightsResponse(version=version, tensors=0)
        self._replica.load_weights(version, named)
        return rollout_pb2.PushWeightsResponse(version=version, tensors=len(named))
