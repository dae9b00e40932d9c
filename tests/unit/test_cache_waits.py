"""How many of the cache's gRPC workers may hold a waiting request, and the inverse the benches
size a cache with (`asyncopd.cache.waits`), checked against the rule counted out by hand."""

from __future__ import annotations

import pytest
from asyncopd.cache.waits import waiting_limit, workers_for


def test_waiting_limit_keeps_a_reserve_of_an_eighth_between_2_and_32() -> None:
    assert [waiting_limit(w) for w in (3, 8, 32, 64, 512, 4096)] == [1, 6, 28, 56, 480, 4064]
    with pytest.raises(ValueError, match="workers"):
        waiting_limit(0)
    with pytest.raises(ValueError, match="waiting"):
        workers_for(0)


@pytest.mark.parametrize("waiting", [1, 6, 7, 100, 289, 480, 481, 5000])
def test_workers_for_is_the_fewest_workers_that_let_that_many_wait(waiting: int) -> None:
    workers = workers_for(waiting)
    assert waiting_limit(workers) >= waiting
    assert workers == 1 or waiting_limit(workers - 1) < waiting
