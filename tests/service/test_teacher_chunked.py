"""The teacher scorer computes its log-probs a chunk of positions at a time and prefills rows
longer than max_batch_tokens in segments: the answers must not depend on either (equal, to fp
tolerance, to one dense full-vocabulary log-softmax per rollout), also at Qwen3's vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from asyncopd.records import Rollout, SupportKind
from asyncopd.teacher.scorer import TeacherScorer
from test_teacher import dense_logprobs, random_rollouts
from transformers import AutoModelForCausalLM
from wide_models import QWEN3_VOCAB, make_wide_qwen3

pytestmark = pytest.mark.service


def assert_equal_to_dense(model: torch.nn.Module, rollouts: list[Rollout], scorer: TeacherScorer, topk: int) -> None:
    scores = scorer.score(rollouts, topk=topk, tail=True)
    for r, s in zip(rollouts, scores, strict=True):
        dense = dense_logprobs(model, r)
        response = torch.from_numpy(r.response_ids.astype(np.int64))
        np.testing.assert_allclose(s.token_logprobs, dense.gather(-1, response[:, None]).squeeze(-1), atol=1e-4)
        top = dense.topk(topk, dim=-1)
        np.testing.assert_allclose(s.topk_logprobs, top.values, atol=1e-4)  # type: ignore[arg-type]
        tail = torch.logsumexp(dense.scatter(-1, top.indices, float("-inf")), dim=-1)
        np.testing.assert_allclose(s.tail_logmass, tail, atol=1e-4)  # type: ignore[arg-type]
        if r.support_ids is not None:
            want = dense.gather(-1, torch.from_numpy(r.support_ids.astype(np.int64)))
            np.testing.assert_allclose(s.support_logprobs, want, atol=1e-4)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def toy_teacher() -> torch.nn.Module:
    from asyncopd.models.loading import load_model

    return load_model("assets/toy-teacher")


@pytest.mark.parametrize("chunk_elements", [32, 32 * 7, 1 << 20])  # 1 row, 7 rows, everything in one chunk
def test_chunk_size_does_not_change_scores(toy_teacher: torch.nn.Module, chunk_elements: int) -> None:
    rollouts = random_rollouts(7, SupportKind.MC_SAMPLES, 5, seed=3)
    scorer = TeacherScorer(toy_teacher, max_batch_tokens=4096, chunk_elements=chunk_elements)  # type: ignore[arg-type]
    assert_equal_to_dense(toy_teacher, rollouts, scorer, topk=6)


def test_rows_longer_than_max_batch_tokens_are_prefilled_in_segments(toy_teacher: torch.nn.Module) -> None:
    rollouts = random_rollouts(6, SupportKind.STUDENT_TOPK, 3, seed=8)
    budget = 9
    assert any(r.num_tokens + len(r.prompt_ids) > 2 * budget for r in rollouts)
    scorer = TeacherScorer(toy_teacher, max_batch_tokens=budget, chunk_elements=64)  # type: ignore[arg-type]
    calls: list[int] = []
    decoder = scorer._decoder
    forward = decoder.forward

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(int(kwargs["input_ids"].shape[1]))  # type: ignore[union-attr]
        return forward(*args, **kwargs)

    decoder.forward = counted  # type: ignore[method-assign]
    try:
        scorer.score(rollouts, topk=4, tail=True)
    finally:
        decoder.forward = forward  # type: ignore[method-assign]
    assert max(calls) <= budget, "no forward pass holds more than max_batch_tokens tokens of a row"
    assert len(calls) > len(rollouts), "long rows took several segments"
    assert_equal_to_dense(toy_teacher, rollouts, scorer, topk=4)


def test_chunked_scores_at_the_real_vocabulary(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_wide_qwen3(tmp_path / "teacher", seed=1)).eval()
    rng = np.random.default_rng(0)
    rollouts = random_rollouts(2, SupportKind.MC_SAMPLES, 64, seed=5)
    wide = []
    for r in rollouts:  # ids anywhere in the 151,936-row vocabulary
        support = rng.integers(0, QWEN3_VOCAB, r.support_ids.shape).astype(np.int32)  # type: ignore[union-attr]
        response = rng.integers(0, QWEN3_VOCAB, r.num_tokens).astype(np.int32)
        support[:, 0] = response
        wide.append(
            Rollout(**{**r.__dict__, "response_ids": response, "support_ids": support})  # type: ignore[arg-type]
        )
    scorer = TeacherScorer(model, max_batch_tokens=16)
    assert scorer._rows < 8, "positions really are split into chunks"
    assert_equal_to_dense(model, wide, scorer, topk=64)
