"""Typed client of a rollout replica: generate now, read its status, push weights over gRPC.

Domain records in and out; what comes back is validated with `Limits`. It knows the
RolloutService RPCs; it knows nothing of engines.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch

from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.v1 import rollout_pb2, rollout_pb2_grpc
from asyncopd.wire.convert import Limits, prompt_to_proto, rollout_from_proto
from asyncopd.wire.tensors import encode


@dataclass(frozen=True)
class RolloutStatus:
    replica: str
    version: int
    tokens_per_second: float
    generated_tokens: int
    engine: str
    paused: bool


class RolloutClient:
    """Blocking client of `asyncopd.v1.RolloutService`."""

    def __init__(self, channel: grpc.Channel, limits: Limits | None = None, timeout_s: float = 600.0) -> None:
        self._stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        self._limits = limits or Limits()
        self._timeout = timeout_s

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 0,
        stop: Sequence[str] = (),
        greedy: bool = False,
        seed: int = 0,
        support_kind: SupportKind = SupportKind.NONE,
        support_k: int = 0,
    ) -> list[Rollout]:
        """One rollout per prompt, in order (max_tokens 0 = the replica's configured default)."""
        request = rollout_pb2.GenerateRequest(
            prompts=[prompt_to_proto(p) for p in prompts],
            sampling=rollout_pb2.SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                stop=list(stop),
                greedy=greedy,
                seed=seed,
            ),
            support_kind=int(support_kind),  # type: ignore[arg-type]
            support_k=support_k,
        )
        response = self._stub.Generate(request, timeout=self._timeout)
        return [rollout_from_proto(r, self._limits, f"rollouts[{i}]") for i, r in enumerate(response.rollouts)]

    def status(self) -> RolloutStatus:
        r = self._stub.Status(rollout_pb2.RolloutStatusRequest(), timeout=self._timeout)
        return RolloutStatus(r.replica, r.version, r.tokens_per_second, r.generated_tokens, r.engine, r.paused)

    def push_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send a whole update (one chunk per parameter); returns the number of tensors applied."""
        tensors = list(named_tensors)

        def chunks() -> Iterator[rollout_pb2.WeightChunk]:
            for i, (name, tensor) in enumerate(tensors):
                yield rollout_pb2.WeightChunk(
                    version=version, name=name, tensor=encode(tensor.detach().cpu()), last=i == len(tensors) - 1
                )

        return int(self._stub.PushWeights(chunks(), timeout=self._timeout).tensors)
