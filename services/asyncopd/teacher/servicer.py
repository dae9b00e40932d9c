"""The TeacherService gRPC servicer: validate the rollouts, score them, return the scores."""

from __future__ import annotations

import grpc

from asyncopd.teacher.replica import TeacherReplica
from asyncopd.v1 import teacher_pb2, teacher_pb2_grpc
from asyncopd.wire import Limits, WireError, rollout_from_proto, scores_to_proto
from asyncopd.wire.rpc import status_errors

SERVICE_NAME = "asyncopd.v1.TeacherService"


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    def __init__(self, replica: TeacherReplica) -> None:
        self._replica = replica
        scorer = replica.scorer
        self._limits = Limits(
            vocab_size=scorer.vocab_size, max_prompt_tokens=scorer.max_len, max_response_tokens=scorer.max_len
        )

    @status_errors
    def Score(  # noqa: N802 - gRPC method name
        self, request: teacher_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.ScoreResponse:
        if not request.rollouts:
            raise WireError("rollouts: at least one rollout is required")
        rollouts = [rollout_from_proto(r, self._limits, f"rollouts[{i}]") for i, r in enumerate(request.rollouts)]
        scores = self._replica.score(rollouts, request.topk, request.tail)
        return teacher_pb2.ScoreResponse(scores=[scores_to_proto(s) for s in scores])
