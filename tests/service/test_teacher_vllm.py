"""The vLLM teacher backend gives the torch scorer's answers (to fp tolerance): at the toy
vocabulary with chunked prefill and small row blocks, with prefix-cache hits, and at Qwen3's
151,936-token vocabulary with top-64 and 64 support ids anywhere in it; only small arrays leave
the engine; bad input is refused before the engine sees it, and the engine keeps serving."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from asyncopd.config import config_from_dict
from asyncopd.models.loading import TokenizerMismatchError
from asyncopd.models.vllm_env import vllm_available
from asyncopd.records import Rollout, SupportKind, TeacherScores
from asyncopd.teacher.main import build_scorer
from asyncopd.teacher.replica import TeacherReplica
from asyncopd.teacher.scorer import TeacherScorer
from asyncopd.teacher.servicer import TeacherServicer
from asyncopd.v1 import teacher_pb2
from asyncopd.wire import rollout_to_proto
from test_teacher import random_rollouts
from tiny_models import make_tiny_qwen3
from transformers import AutoModelForCausalLM
from wide_models import QWEN3_VOCAB, make_wide_qwen3

if not vllm_available() and not os.environ.get("CI"):
    pytest.skip("vllm(-cpu) is not installed (CI installs it and runs these tests)", allow_module_level=True)

from asyncopd.teacher.vllm_scorer import VLLMTeacherScorer

pytestmark = [pytest.mark.service, pytest.mark.vllm]

ATOL = 1e-4


def assert_same_scores(got: list[TeacherScores], want: list[TeacherScores], rollouts: list[Rollout]) -> None:
    assert len(got) == len(want) == len(rollouts)
    for g, w, r in zip(got, want, rollouts, strict=True):
        assert g.sample_id == w.sample_id == r.sample_id
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=ATOL)
        for field in ("topk_logprobs", "support_logprobs", "tail_logmass"):
            a, b = getattr(g, field), getattr(w, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.shape == b.shape, field
                np.testing.assert_allclose(a, b, atol=ATOL, err_msg=field)
        if w.topk_ids is not None:
            assert g.topk_ids is not None
            # Ids may swap only where two log-probs tie to fp precision.
            differ = g.topk_ids != w.topk_ids
            assert np.all(np.abs(g.topk_logprobs - w.topk_logprobs)[differ] < ATOL)  # type: ignore[operator]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "teacher", seed=3)


@pytest.fixture(scope="module")
def tiny_vllm(tiny_dir: Path) -> Iterator[VLLMTeacherScorer]:
    # 16 tokens per step: every rollout longer than that is prefilled in several chunks;
    # 96 elements per block: 3 positions of the 32-token vocabulary per compute_logits call.
    scorer = VLLMTeacherScorer(
        str(tiny_dir),
        "vllm-teacher",
        dtype="float32",
        max_model_len=128,
        max_batch_tokens=16,
        enforce_eager=True,
        chunk_elements=96,
        extra_args={"block_size": 32},  # vLLM-CPU's default block (128) is longer than these rows
    )
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def tiny_torch(tiny_dir: Path) -> TeacherScorer:
    return TeacherScorer(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), "vllm-teacher")


@pytest.mark.parametrize(
    ("kind", "k", "topk", "tail"),
    [(SupportKind.MC_SAMPLES, 5, 6, True), (SupportKind.STUDENT_TOPK, 4, 0, False), (SupportKind.NONE, 0, 32, True)],
)
def test_same_scores_as_the_torch_scorer(  # noqa: PLR0917 - fixtures and parameters
    tiny_vllm: VLLMTeacherScorer, tiny_torch: TeacherScorer, kind: SupportKind, k: int, topk: int, tail: bool
) -> None:
    rollouts = random_rollouts(12, kind, k, seed=k + topk)
    assert any(len(r.prompt_ids) + r.num_tokens > 16 for r in rollouts), "some rows take several prefill chunks"
    assert_same_scores(tiny_vllm.score(rollouts, topk, tail), tiny_torch.score(rollouts, topk, tail), rollouts)


def test_prefix_cache_hits_inside_responses_are_rescored(
    tiny_vllm: VLLMTeacherScorer, tiny_torch: TeacherScorer
) -> None:
    # Long rows sharing one prompt, scored twice: the second time whole blocks of each response
    # come from the prefix cache, and those positions must be computed again, not lost.
    base = random_rollouts(4, SupportKind.MC_SAMPLES, 3, seed=11)
    prompt = np.arange(4, 24, dtype=np.int32)
    rollouts = [replace(r, prompt_ids=prompt) for r in base]
    want = tiny_torch.score(rollouts, 4, True)
    assert_same_scores(tiny_vllm.score(rollouts, 4, True), want, rollouts)
    before = tiny_vllm.rescored
    assert_same_scores(tiny_vllm.score(rollouts, 4, True), want, rollouts)
    assert tiny_vllm.rescored > before, "the second pass hit the prefix cache inside the responses"


def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    tiny_vllm: VLLMTeacherScorer, tiny_torch: TeacherScorer
) -> None:
    (good,) = random_rollouts(1, SupportKind.MC_SAMPLES, 3, seed=2)
    bad_support = replace(good, support_ids=np.full_like(good.support_ids, tiny_vllm.vocab_size))
    with pytest.raises(ValueError, match="support_ids"):
        tiny_vllm.score([good, bad_support], 2, True)
    with pytest.raises(ValueError, match="topk"):
        tiny_vllm.score([good], tiny_vllm.vocab_size + 1, False)
    too_long = replace(good, prompt_ids=np.full(tiny_vllm.max_len, 5, dtype=np.int32))
    with pytest.raises(ValueError, match="context"):
        tiny_vllm.score([too_long], 2, False)
    # Over gRPC's servicer: INVALID_ARGUMENT, not an engine failure.
    servicer = TeacherServicer(TeacherReplica(tiny_vllm, "vllm-teacher"))
    request = teacher_pb2.ScoreRequest(rollouts=[rollout_to_proto(bad_support)], topk=2, tail=True)

    class Context:
        code: grpc.StatusCode | None = None

        def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code = code
            raise grpc.RpcError(details)

        def set_code(self, code: grpc.StatusCode) -> None:
            self.code = code

        def set_details(self, details: str) -> None:
            pass

    context = Context()
    with contextlib.suppress(grpc.RpcError):
        servicer.Score(request, context)  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_same_scores(tiny_vllm.score([good], 2, True), tiny_torch.score([good], 2, True), [good])


def test_backend_switch_and_tokenizer_check(tiny_dir: Path, tmp_path: Path) -> None:
    config = config_from_dict({"teacher": {"backend": "vllm"}, "models": {"teacher": str(tiny_dir)}})
    assert config.teacher.vllm.enable_prefix_caching and config.teacher.vllm.tensor_parallel_size == 1
    other = make_wide_qwen3(tmp_path / "other", vocab_size=64)
    tokenizer_json = other / "tokenizer.json"
    text = tokenizer_json.read_text()
    tokenizer_json.write_text(
        text.replace('"1": ', '"__one__": ').replace('"2": ', '"1": ').replace('"__one__": ', '"2": ')
    )
    mismatched = config_from_dict(
        {"teacher": {"backend": "vllm"}, "models": {"teacher": str(other), "student": str(tiny_dir)}}
    )
    with pytest.raises(TokenizerMismatchError, match="share one tokenizer"):
        build_scorer(mismatched, "teacher-x")


def test_same_scores_at_the_real_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> None:
    wide = make_wide_qwen3(tmp_path_factory.mktemp("wide") / "teacher", seed=1)
    rng = np.random.default_rng(0)
    rollouts = []
    for r in random_rollouts(3, SupportKind.MC_SAMPLES, 64, seed=5):
        support = rng.integers(0, QWEN3_VOCAB, r.support_ids.shape).astype(np.int32)  # type: ignore[union-attr]
        response = rng.integers(0, QWEN3_VOCAB, r.num_tokens).astype(np.int32)
        support[:, 0] = response
        rollouts.append(replace(r, response_ids=response, support_ids=support))
    scorer = VLLMTeacherScorer(str(wide), dtype="float32", max_model_len=128, max_batch_tokens=32, enforce_eager=True)
    try:
        assert scorer.vocab_size == QWEN3_VOCAB
        got = scorer.score(rollouts, 64, True)
        positions = sum(r.num_tokens for r in rollouts)
        # per position: log p at token + 64 support ids, top-64 ids and log-probs, the tail
        assert scorer.host_bytes == positions * ((1 + 64) * 4 + 64 * 8 + 4)
    finally:
        scorer.close()
    torch_scorer = TeacherScorer(AutoModelForCausalLM.from_pretrained(wide).eval())
    assert_same_scores(got, torch_scorer.score(rollouts, 64, True), rollouts)
    assert got[0].support_logprobs is not None and np.isfinite(got[0].support_logprobs).all()
