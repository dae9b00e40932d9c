"""The learner's batching without a model: `collate`'s padded layout, `plan_micro_batches`'
budgets, and packing, each checked position by position against a naive construction.

The learner step tests cover the same code through a tiny Qwen3 (minutes); these are the fast
tests `make mutate` runs against learner/batching.py, next to test_learner_batching.py (plans, packing).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from asyncopd.learner.batching import collate, pack_positions, plan_micro_batches, unpack_positions
from asyncopd.records import Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores

pytestmark = pytest.mark.unit

K = 3


def sample(i: int, prompt: int, response: int, kind: str = "forward_kl_topk") -> ScoredSample:
    """Sample i: prompt ids 100i+1.., response ids 100i+50.., per-position data that encodes (i, t, k)."""
    rng = np.random.default_rng(i)
    ids = (1000 * i + 10 * np.arange(response)[:, None] + np.arange(K)[None, :]).astype(np.int32)
    values = rng.standard_normal((response, K)).astype(np.float32)
    support_kind = {"reverse_kl_topk": SupportKind.STUDENT_TOPK, "reverse_kl_mc": SupportKind.MC_SAMPLES}.get(
        kind, SupportKind.NONE
    )
    rollout = Rollout(
        sample_id=f"s{i}",
        prompt_id=f"p{i}",
        ticket="",
        task=TaskInfo("toy", "0"),
        prompt_ids=(100 * i + 1 + np.arange(prompt)).astype(np.int32),
        response_ids=(100 * i + 50 + np.arange(response)).astype(np.int32),
        behavior_logprobs=np.full(response, -1.0, np.float32),
        versions=np.zeros(response, np.int32),
        support_kind=support_kind,
        support_ids=ids if support_kind != SupportKind.NONE else None,
        support_logprobs=(values - 1.0) if support_kind != SupportKind.NONE else None,
    )
    scores = TeacherScores(
        sample_id=f"s{i}",
        token_logprobs=np.zeros(response, np.float32),
        topk_ids=ids if kind == "forward_kl_topk" else None,
        topk_logprobs=values if kind == "forward_kl_topk" else None,
        support_logprobs=values if support_kind != SupportKind.NONE else None,
    )
    return ScoredSample(rollout, scores)


SHAPES = [(3, 4), (1, 6), (5, 1), (2, 2)]  # (prompt, response) per sample


@pytest.mark.parametrize("kind", ["forward_kl_topk", "reverse_kl_topk", "reverse_kl_mc", "forward_kl_full"])
def test_collate_matches_a_naive_layout(kind: str) -> None:
    samples = [sample(i, p, t, kind) for i, (p, t) in enumerate(SHAPES)]
    batch = collate(samples, kind, pad_id=7)
    longest = max(p + t for p, t in SHAPES)
    responses = max(t for _, t in SHAPES)
    assert batch.input_ids.shape == batch.attention_mask.shape == (len(SHAPES), longest)
    assert batch.logit_index.shape == batch.valid.shape == (len(SHAPES), responses)
    assert batch.size == len(SHAPES) and batch.tokens == sum(t for _, t in SHAPES) and not batch.packed
    assert batch.lengths() == [p + t for p, t in SHAPES]
    for i, ((p, t), s) in enumerate(zip(SHAPES, samples, strict=True)):
        sequence = list(s.rollout.prompt_ids) + list(s.rollout.response_ids)
        assert batch.input_ids[i].tolist() == sequence + [7] * (longest - p - t)
        assert batch.attention_mask[i].tolist() == [1] * (p + t) + [0] * (longest - p - t)
        assert batch.valid[i].tolist() == [True] * t + [False] * (responses - t)
        # the logits at position P - 1 + t score response token t
        assert batch.logit_index[i, :t].tolist() == [p - 1 + j for j in range(t)]
        assert batch.logit_index[i, t:].tolist() == [0] * (responses - t)
        for j in range(t):
            assert sequence[int(batch.logit_index[i, j]) + 1] == s.rollout.response_ids[j]
    if kind == "forward_kl_full":
        assert batch.ids is None and batch.teacher_logprobs is None and batch.behavior_logprobs is None
        return
    assert batch.ids is not None and batch.teacher_logprobs is not None
    assert batch.ids.shape == batch.teacher_logprobs.shape == (len(SHAPES), responses, K)
    assert batch.ids.dtype == torch.int64 and batch.teacher_logprobs.dtype == torch.float32
    for i, ((_, t), s) in enumerate(zip(SHAPES, samples, strict=True)):
        want_ids = s.scores.topk_ids if kind == "forward_kl_topk" else s.rollout.support_ids
        want_teacher = s.scores.topk_logprobs if kind == "forward_kl_topk" else s.scores.support_logprobs
        assert np.array_equal(batch.ids[i, :t].numpy(), want_ids)
        assert np.array_equal(batch.teacher_logprobs[i, :t].numpy(), want_teacher)
        assert not batch.ids[i, t:].any() and not batch.teacher_logprobs[i, t:].any()
    if kind == "reverse_kl_mc":
        assert batch.behavior_logprobs is not None
        for i, ((_, t), s) in enumerate(zip(SHAPES, samples, strict=True)):
            assert np.array_equal(batch.behavior_logprobs[i, :t].numpy(), s.rollout.support_logprobs)
            assert not batch.behavior_logprobs[i, t:].any()
    else:
        assert batch.behavior_logprobs is None


def test_collate_refuses_what_the_estimator_cannot_use() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], "forward_kl_topk")
    with pytest.raises(ValueError, match="empty prompt"):
        collate([sample(0, 0, 3)], "forward_kl_topk")
    with pytest.raises(ValueError, match=r"'s0'.*topk_ids"):
        collate([sample(0, 2, 3, "reverse_kl_topk")], "forward_kl_topk")
    with pytest.raises(ValueError, match=r"'s0'.*support_kind"):
        collate([sample(0, 2, 3, "forward_kl_topk")], "reverse_kl_topk")
    with pytest.raises(ValueError, match=r"'s0'.*support_kind"):
        collate([sample(0, 2, 3, "reverse_kl_topk")], "reverse_kl_mc")  # top-K support is not MC draws
    mismatched = sample(1, 2, 3)
    short = ScoredSample(
        mismatched.rollout,
        TeacherScores(
            "s1",
            np.zeros(3, np.float32),
            topk_ids=np.zeros((2, K), np.int32),
            topk_logprobs=np.zeros((2, K), np.float32),
        ),
    )
    with pytest.raises(ValueError, match=r"'s1'.*3 response tokens"):
        collate([short], "forward_kl_topk")
    wide = ScoredSample(
        mismatched.rollout,
        TeacherScores(
            "s1",
            np.zeros(3, np.float32),
            topk_ids=np.zeros((3, K + 1), np.int32),
            topk_logprobs=np.zeros((3, K + 1), np.float32),
        ),
    )
    with pytest.raises(ValueError, match="different K/N"):
        collate([sample(0, 2, 3), wide], "forward_kl_topk")
    no_behavior = sample(2, 2, 3, "reverse_kl_mc")
    rollout = no_behavior.rollout
    stripped = Rollout(**{**rollout.__dict__, "support_logprobs": None})
    with pytest.raises(ValueError, match="behaviour support_logprobs"):
        collate([ScoredSample(stripped, no_behavior.scores)], "reverse_kl_mc")
    no_teacher = ScoredSample(rollout, TeacherScores("s2", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="teacher support_logprobs"):
        collate([no_teacher], "reverse_kl_mc")


def naive_plan(
    lengths: list[int], lo: int, hi: int, *, max_rows: int, max_tokens: int, packed: bool
) -> list[tuple[int, int]]:
    """Greedy by definition: extend the current range while its cost stays within the budget."""
    if not max_tokens:
        return [(s, min(s + max_rows, hi)) for s in range(lo, hi, max_rows)]
    out, start = [], lo
    while start < hi:
        stop = start + 1
        while stop < hi:
            rows = lengths[start : stop + 1]
            cost = sum(rows) if packed else len(rows) * max(rows)
            if cost > max_tokens:
                break
            stop += 1
        out.append((start, stop))
        start = stop
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_plan_micro_batches_matches_the_greedy_definition(seed: int, packed: bool) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 12, size=int(rng.integers(1, 10)))]
    lo = int(rng.integers(0, len(lengths)))
    hi = int(rng.integers(lo, len(lengths) + 1))
    max_rows = int(rng.integers(1, 4))
    max_tokens = int(rng.choice([0, 8, 12, 20, 30]))
    got = plan_micro_batches(lengths, lo, hi, max_rows=max_rows, max_tokens=max_tokens, packed=packed)
    assert got == naive_plan(lengths, lo, hi, max_rows=max_rows, max_tokens=max_tokens, packed=packed)
    assert [r for a, b in got for r in range(a, b)] == list(range(lo, hi))  # every row once, in order


def test_plan_micro_batches_at_the_budget_exactly() -> None:
    # padded: 2 rows x longest 5 = 10 fits a budget of 10, a third row (15) does not
    assert plan_micro_batches([5, 5, 5], 0, 3, max_rows=1, max_tokens=10) == [(0, 2), (2, 3)]
    assert plan_micro_batches([5, 5, 5], 0, 3, max_rows=1, max_tokens=9) == [(0, 1), (1, 2), (2, 3)]
    # padded cost uses the longest row: [2, 6] costs 12, not 8
    assert plan_micro_batches([2, 6], 0, 2, max_rows=1, max_tokens=11) == [(0, 1), (1, 2)]
    # packed: the sum; a row over the budget is alone, never split or dropped
    assert plan_micro_batches([2, 6, 3], 0, 3, max_rows=1, max_tokens=8, packed=True) == [(0, 2), (2, 3)]
    assert plan_micro_batches([20, 1], 0, 2, max_rows=1, max_tokens=8, packed=True) == [(0, 1), (1, 2)]
    assert plan_micro_batches([4, 4, 4], 1, 3, max_rows=2) == [(1, 3)]
    assert plan_micro_batches([4, 4, 4], 2, 2, max_rows=2, max_tokens=8) == []
    with pytest.raises(ValueError, match="max_rows"):
        plan_micro_batches([1], 0, 1, max_rows=0)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([1], 0, 1, max_rows=1, max_tokens=-1)


def test_pack_concatenates_rows_and_keeps_every_position() -> None:
    samples = [sample(i, p, t, "reverse_kl_mc") for i, (p, t) in enumerate(SHAPES)]
    batch = collate(samples, "reverse_kl_mc")
    packed = batch.pack()
    assert packed.packed and packed.size == 1 and packed.tokens == batch.tokens
    sequences = [list(s.rollout.prompt_ids) + list(s.rollout.response_ids) for s in samples]
    assert packed.input_ids[0].tolist() == [x for seq in sequences for x in seq]
    assert packed.attention_mask.tolist() == [[1] * sum(map(len, sequences))]
    assert packed.position_ids is not None
    assert packed.position_ids[0].tolist() == [j for seq in sequences for j in range(len(seq))]
    # logit_index points at the same tokens in the packed row as in the padded rows
    flat = packed.input_ids[0].tolist()
    want = [int(s.rollout.response_ids[j]) for s in samples for j in range(s.rollout.num_tokens)]
    assert [flat[int(x) + 1] for x in packed.logit_index[0]] == want
    for name in ("ids", "teacher_logprobs", "behavior_logprobs"):
        padded, flat_t = getattr(batch, name), getattr(packed, name)
        assert torch.equal(flat_t, padded[batch.valid].unsqueeze(0)), name
        assert torch.equal(unpack_positions(flat_t, batch.valid), padded), name
    with pytest.raises(ValueError, match="already packed"):
        packed.pack()
    assert pack_positions(None, batch.valid) is None


def test_slice_and_to_keep_rows_and_fields() -> None:
    batch = collate([sample(i, p, t, "reverse_kl_mc") for i, (p, t) in enumerate(SHAPES)], "reverse_kl_mc")
    part = batch.slice(1, 3)
    moved = batch.to("cpu")
    for name in ("input_ids", "attention_mask", "logit_index", "valid", "ids", "teacher_logprobs", "behavior_logprobs"):
        assert torch.equal(getattr(part, name), getattr(batch, name)[1:3]), name
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name
    assert part.position_ids is None and moved.position_ids is None
    packed = batch.pack()
    assert torch.equal(packed.to("cpu").position_ids, packed.position_ids)  # type: ignore[arg-type]
    assert torch.equal(packed.slice(0, 1).position_ids, packed.position_ids)  # type: ignore[arg-type]


def test_an_empty_range_plans_nothing_whatever_the_int_objects() -> None:
    # equal bounds built separately (ints above 256 are distinct objects): compared by value
    lo, hi = 300, int("300")
    assert plan_micro_batches([1] * 400, lo, hi, max_rows=1, max_tokens=8) == []
    assert plan_micro_batches([1] * 400, lo, hi, max_rows=2) == []


def test_a_batch_is_a_value() -> None:
    batch = collate([sample(0, 2, 3)], "forward_kl_topk")
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.valid = batch.valid  # type: ignore[misc]
