"""The RolloutService gRPC servicer: parse and validate, call `RolloutReplica`, build the reply.

Request defaults (proto3 cannot tell 0 from unset): a GenerateRequest without `sampling` uses
the replica's configured sampling; with it, top_p 0 means 1.0 (off) and max_tokens 0 means the
configured max_tokens; temperature must be > 0 unless `greedy`; stop strings and seed are taken
as given. PushWeights assembles the streamed parameters (whole or sliced) and applies them
atomically when the chunk marked `last` arrives; its `checksum` field is not verified here
(the collective transport verifies checksums; this fallback has none agreed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import torch

from asyncopd.records import SupportKind
from asyncopd.rollout.replica import RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.v1 import rollout_pb2, rollout_pb2_grpc
from asyncopd.wire import Limits, WireError, decode_torch, prompt_from_proto, rollout_to_proto
from asyncopd.wire.rpc import status_errors

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
    def __init__(self, replica: RolloutReplica, default_sampling: Sampling) -> None:
        self._replica = replica
        self._default = default_sampling
        info = replica.engine.info
        self._limits = Limits(vocab_size=info.vocab_size, max_prompt_tokens=info.max_model_len - 1)

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
        version: int | None = None
        whole: dict[str, torch.Tensor] = {}
        flat: dict[str, torch.Tensor] = {}
        shapes = self._replica.engine.param_shapes()
        for i, chunk in enumerate(request_iterator):
            if version is None:
                version = chunk.version
            elif chunk.version != version:
                raise WireError(f"chunks[{i}].version: {chunk.version} differs from the update's {version}")
            if not chunk.name:
                raise WireError(f"chunks[{i}].name: must not be empty")
            tensor = decode_torch(chunk.tensor, f"chunks[{i}].tensor")
            if chunk.numel:
                # Checked before allocating: a hostile numel (negative, or petabytes) must be refused,
                # not handed to the allocator.
                if chunk.name not in shapes:
                    raise WireError(f"chunks: unknown parameter {chunk.name!r}")
                want = math.prod(shapes[chunk.name])
                if chunk.numel != want:
                    raise WireError(f"chunks[{i}].numel: {chunk.numel}, but {chunk.name} has {want} elements")
                buf = flat.setdefault(chunk.name, torch.empty(chunk.numel, dtype=tensor.dtype))
                end = chunk.offset + tensor.numel()
                if chunk.offset < 0 or end > buf.numel():
                    raise WireError(f"chunks[{i}]: slice {chunk.offset}..{end} outside {chunk.name} ({buf.numel()})")
                buf[chunk.offset : end] = tensor.reshape(-1)
            else:
                whole[chunk.name] = tensor.clone()
            if chunk.last:
                break
        else:
            raise WireError("chunks: the stream ended without a chunk marked last")
        if version is None:
            raise WireError("chunks: empty update")
        for name, buf in flat.items():
            if name not in shapes:
                raise WireError(f"chunks: unknown parameter {name!r}")
            whole[name] = buf.reshape(shapes[name])
        self._replica.load_weights(version, list(whole.items()))
        return rollout_pb2.PushWeightsResponse(version=version, tensors=len(whole))
