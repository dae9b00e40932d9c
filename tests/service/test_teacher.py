"""Teacher scoring: equal to a dense recomputation gathered at the same ids, independent of
batching; over gRPC, bad input is INVALID_ARGUMENT; startup refuses a different tokenizer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from asyncopd.config import config_from_dict
from asyncopd.config.endpoints import ServerConfig
from asyncopd.models.loading import TokenizerMismatchError, load_model
from asyncopd.observability import metrics
from asyncopd.records import Rollout, SupportKind, TaskInfo
from asyncopd.teacher.main import build_scorer
from asyncopd.teacher.replica import TeacherReplica
from asyncopd.teacher.scorer import TeacherScorer
from asyncopd.teacher.servicer import SERVICE_NAME, TeacherServicer
from asyncopd.v1 import teacher_pb2, teacher_pb2_grpc
from asyncopd.wire import Limits, rollout_to_proto
from asyncopd.wire.rpc import channel, start_server
from asyncopd.wire.teacher_client import TeacherClient

pytestmark = pytest.mark.service

TEACHER = "assets/toy-teacher"
STUDENT = "assets/toy-student"
VOCAB = 32


def random_rollouts(n: int, kind: SupportKind, k: int, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, t = int(rng.integers(1, 20)), int(rng.integers(1, 30))
        response = rng.integers(0, VOCAB, t).astype(np.int32)
        support = None
        if kind != SupportKind.NONE:
            support = rng.integers(0, VOCAB, (t, k)).astype(np.int32)
            if kind == SupportKind.MC_SAMPLES:
                support[:, 0] = response
        out.append(
            Rollout(
                sample_id=f"s{i}",
                prompt_id=f"p{i}",
                ticket="",
                task=TaskInfo("toy", "0"),
                prompt_ids=rng.integers(4, VOCAB, p).astype(np.int32),
                response_ids=response,
                behavior_logprobs=np.full(t, -1.0, dtype=np.float32),
                versions=np.zeros(t, dtype=np.int32),
                support_kind=kind,
                support_ids=support,
                support_logprobs=None if support is None else np.full(support.shape, -1.0, dtype=np.float32),
            )
        )
    return out


def dense_logprobs(model: torch.nn.Module, r: Rollout) -> torch.Tensor:
    """[T, V] float64 teacher log-probs at the response positions, one sequence at a time."""
    full = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(full).logits[0].double()
    p = len(r.prompt_ids)
    return torch.log_softmax(logits[p - 1 : -1], dim=-1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(TEACHER)


@pytest.mark.parametrize(
    ("kind", "k"), [(SupportKind.STUDENT_TOPK, 5), (SupportKind.MC_SAMPLES, 4), (SupportKind.NONE, 0)]
)
def test_scores_equal_dense_recomputation_gathered_at_the_same_ids(
    model: torch.nn.Module, kind: SupportKind, k: int
) -> None:
    rollouts = random_rollouts(9, kind, k)
    scorer = TeacherScorer(model, "t0", max_batch_tokens=4096)  # type: ignore[arg-type]
    scores = scorer.score(rollouts, topk=6, tail=True)
    assert [s.sample_id for s in scores] == [r.sample_id for r in rollouts]
    for r, s in zip(rollouts, scores, strict=True):
        dense = dense_logprobs(model, r)
        t = r.num_tokens
        assert s.teacher == "t0" and s.token_logprobs.shape == (t,)
        response = torch.from_numpy(r.response_ids.astype(np.int64))
        np.testing.assert_allclose(s.token_logprobs, dense.gather(-1, response[:, None]).squeeze(-1), atol=1e-4)
        assert s.topk_ids is not None and s.topk_logprobs is not None and s.tail_logmass is not None
        top = dense.topk(6, dim=-1)
        np.testing.assert_allclose(s.topk_logprobs, top.values, atol=1e-4)
        np.testing.assert_allclose(
            dense.gather(-1, torch.from_numpy(s.topk_ids.astype(np.int64))), top.values, atol=1e-4
        )  # the returned ids are the true top-K (up to ties)
        tail = torch.log1p(-top.values.exp().sum(-1))
        np.testing.assert_allclose(s.tail_logmass, tail, atol=1e-4)
        if kind == SupportKind.NONE:
            assert s.support_logprobs is None
        else:
            assert r.support_ids is not None and s.support_logprobs is not None
            want = dense.gather(-1, torch.from_numpy(r.support_ids.astype(np.int64)))
            np.testing.assert_allclose(s.support_logprobs, want, atol=1e-4)


def test_batching_by_tokens_does_not_change_scores(model: torch.nn.Module) -> None:
    rollouts = random_rollouts(12, SupportKind.STUDENT_TOPK, 3, seed=4)
    big = TeacherScorer(model, max_batch_tokens=100000).score(rollouts, topk=4)  # type: ignore[arg-type]
    small = TeacherScorer(model, max_batch_tokens=40)  # type: ignore[arg-type]
    assert len(small._batches(rollouts)) > 3
    for a, b in zip(big, small.score(rollouts, topk=4), strict=True):
        assert a.sample_id == b.sample_id
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.support_logprobs, b.support_logprobs, atol=1e-4)  # type: ignore[arg-type]
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)  # type: ignore[arg-type]
        assert a.tail_logmass is None


@pytest.fixture(scope="module")
def served(model: torch.nn.Module) -> Iterator[grpc.Channel]:
    registry = metrics.ServiceRegistry("teacher", "teacher-test", process_metrics=False)
    replica = TeacherReplica(TeacherScorer(model, "teacher-test"), "teacher-test", metrics.TeacherMetrics(registry))  # type: ignore[arg-type]
    servicer = TeacherServicer(replica)
    server = start_server(
        ServerConfig(port=0),
        [lambda s: teacher_pb2_grpc.add_TeacherServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
    )
    ch = channel(server.address)
    try:
        yield ch
    finally:
        ch.close()
        server.stop(grace=0.5)


def test_score_over_grpc(served: grpc.Channel, model: torch.nn.Module) -> None:
    rollouts = random_rollouts(3, SupportKind.MC_SAMPLES, 4, seed=7)
    scores = TeacherClient(served, Limits(vocab_size=VOCAB)).score(rollouts, topk=2, tail=True)
    local = TeacherScorer(model).score(rollouts, topk=2, tail=True)  # type: ignore[arg-type]
    for a, b in zip(scores, local, strict=True):
        np.testing.assert_allclose(a.support_logprobs, b.support_logprobs, atol=1e-6)  # type: ignore[arg-type]
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)  # type: ignore[arg-type]
        assert a.teacher == "teacher-test"


def _request(topk: int = 2, tail: bool = False, **changes: object) -> teacher_pb2.ScoreRequest:
    r = random_rollouts(1, SupportKind.STUDENT_TOPK, 3, seed=1)[0]
    msg = rollout_to_proto(r)
    for key, value in changes.items():
        getattr(msg, key).CopyFrom(value)
    return teacher_pb2.ScoreRequest(rollouts=[msg], topk=topk, tail=tail)


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (teacher_pb2.ScoreRequest(topk=2), "at least one rollout"),
        (_request(topk=VOCAB + 1), "topk"),
        (_request(topk=0, tail=True), "tail"),
        (_request(prompt_ids=rollout_to_proto(random_rollouts(1, SupportKind.NONE, 0)[0]).response_ids), None),
    ],
)
def test_bad_score_requests_are_invalid_argument(
    served: grpc.Channel, request_: teacher_pb2.ScoreRequest, needle: str | None
) -> None:
    stub = teacher_pb2_grpc.TeacherServiceStub(served)
    if needle is None:  # a valid variation: must succeed (guards the parametrization itself)
        assert len(stub.Score(request_, timeout=30).scores) == 1
        return
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert needle in info.value.details()


def test_ids_outside_the_vocabulary_are_invalid_argument(served: grpc.Channel) -> None:
    from asyncopd.wire import encode

    stub = teacher_pb2_grpc.TeacherServiceStub(served)
    for field in ("prompt_ids", "response_ids"):
        bad = _request()
        getattr(bad.rollouts[0], field).CopyFrom(encode(np.array([3, VOCAB + 5], dtype=np.int32)))
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(bad, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the vocabulary" in info.value.details() or "shape" in info.value.details()


def test_teacher_refuses_to_start_with_a_different_tokenizer(tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(Path(__file__).resolve().parents[2] / TEACHER, teacher_dir)
    tokenizer_json = teacher_dir / "tokenizer.json"
    text = tokenizer_json.read_text()
    # Swap the ids of two characters: same vocabulary, different token -> id map.
    text = text.replace('"1": ', '"__one__": ').replace('"2": ', '"1": ').replace('"__one__": ', '"2": ')
    tokenizer_json.write_text(text)
    config = config_from_dict({"models": {"teacher": str(teacher_dir), "student": STUDENT}})
    with pytest.raises(TokenizerMismatchError, match="share one tokenizer"):
        build_scorer(config, "teacher-x")
    ok = config_from_dict({"models": {"teacher": TEACHER, "student": STUDENT}})
    assert build_scorer(ok, "teacher-y").vocab_size == VOCAB
