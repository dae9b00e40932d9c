"""Typed client of a teacher replica: score rollouts now.

Domain records in and out; the scores that come back are validated against the rollouts they
score (shapes, support size). It knows the TeacherService RPC; it knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from asyncopd.records import Rollout, TeacherScores
from asyncopd.v1 import teacher_pb2, teacher_pb2_grpc
from asyncopd.wire.convert import Limits, rollout_to_proto, scores_from_proto


class TeacherClient:
    """Blocking client of `asyncopd.v1.TeacherService`."""

    def __init__(self, channel: grpc.Channel, limits: Limits | None = None, timeout_s: float = 600.0) -> None:
        self._stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        self._limits = limits or Limits()
        self._timeout = timeout_s

    def score(self, rollouts: Sequence[Rollout], topk: int = 0, tail: bool = False) -> list[TeacherScores]:
        """Scores in the order of `rollouts`."""
        request = teacher_pb2.ScoreRequest(rollouts=[rollout_to_proto(r) for r in rollouts], topk=topk, tail=tail)
        response = self._stub.Score(request, timeout=self._timeout)
        if len(response.scores) != len(rollouts):
            raise RuntimeError(f"teacher returned {len(response.scores)} scores for {len(rollouts)} rollouts")
        out = []
        for i, (msg, r) in enumerate(zip(response.scores, rollouts, strict=True)):
            k = None if r.support_ids is None else int(r.support_ids.shape[1])
            out.append(scores_from_proto(msg, self._limits, r.num_tokens, k, f"scores[{i}]"))
        return out
