"""Lockstep's plan: every rank runs the same number of micro-batches; each real one runs on exactly one rank."""

from __future__ import annotations

import pytest
from asyncopd.learner.distributed import Lockstep


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8])
def test_micro_batches_are_dealt_once_with_dummies_filling_the_rounds(world: int, n: int) -> None:
    ranges = [(3 * i, 3 * i + 3) for i in range(n)]
    plans = [Lockstep(rank, world).assign(ranges) for rank in range(world)]
    assert len({len(p) for p in plans}) == 1  # same collectives on every rank
    real = sorted(r[:2] for p in plans for r in p if r[2])
    assert real == ranges
    for p in plans:
        for start, stop, is_real in p:
            assert is_real or (start, stop) == ranges[0]
    assert Lockstep(0, world).grad_scale == world
