"""Micro-batch plans under a token budget, and packing rows into one unpadded row."""

from __future__ import annotations

import pytest
import torch
from asyncopd.learner.batching import TrainBatch, pack_positions, plan_micro_batches, unpack_positions

pytestmark = pytest.mark.unit


def test_rows_without_a_budget() -> None:
    assert plan_micro_batches([5] * 7, 1, 7, max_rows=4) == [(1, 5), (5, 7)]
    assert plan_micro_batches([5] * 7, 3, 3, max_rows=4) == []


def test_padded_budget_counts_rows_times_the_longest() -> None:
    lengths = [4, 4, 10, 3, 3, 3, 30, 2]
    # 4,4 -> 8; +10 -> 3 x 10 = 30 > 20; 10,3 -> 20; +3 -> 30 > 20; 3,3 -> 6; +30 -> 90: alone; 2 -> 60: alone
    assert plan_micro_batches(lengths, 0, 8, max_rows=1, max_tokens=20) == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 7),
        (7, 8),
    ]


def test_packed_budget_counts_the_sum_and_an_oversized_row_goes_alone() -> None:
    lengths = [4, 4, 10, 3, 3, 3, 30, 2]
    assert plan_micro_batches(lengths, 0, 8, max_rows=1, max_tokens=20, packed=True) == [
        (0, 3),
        (3, 6),
        (6, 7),
        (7, 8),
    ]
    assert plan_micro_batches(lengths, 2, 5, max_rows=1, max_tokens=13, packed=True) == [(2, 4), (4, 5)]


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        plan_micro_batches([1], 0, 1, max_rows=0)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([1], 0, 1, max_rows=1, max_tokens=-1)


def padded() -> TrainBatch:
    """Two rows: prompt [1, 2] + response [3, 4, 5]; prompt [6] + response [7]; pad 0."""
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    logit_index = torch.tensor([[1, 2, 3], [0, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    ids = torch.arange(12).reshape(2, 3, 2)
    return TrainBatch(input_ids, attention, logit_index, valid, ids, ids.float(), None)


def test_pack_concatenates_rows_and_restarts_positions() -> None:
    packed = padded().pack()
    assert packed.packed and packed.size == 1 and packed.tokens == 4
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert packed.position_ids is not None and packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # row 1's response token 7 is scored by the logits at its prompt token 6: packed position 5
    assert packed.logit_index.tolist() == [[1, 2, 3, 5]]
    assert packed.input_ids[0, packed.logit_index[0] + 1].tolist() == [3, 4, 5, 7]
    assert packed.ids is not None and packed.ids.tolist() == [[[0, 1], [2, 3], [4, 5], [6, 7]]]
    assert packed.behavior_logprobs is None
    with pytest.raises(ValueError, match="already packed"):
        packed.pack()


def test_unpack_is_the_inverse_of_pack_positions() -> None:
    batch = padded()
    assert batch.ids is not None
    packed = pack_positions(batch.ids, batch.valid)
    assert packed is not None
    restored = unpack_positions(packed, batch.valid)
    assert torch.equal(restored[batch.valid], batch.ids[batch.valid])
    assert int(restored[~batch.valid].abs().sum()) == 0
