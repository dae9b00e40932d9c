"""The study plan's part 4 (the wide world): its rows, cells and names on the command line.

Part 4's rows repeat part 3's labels in another world, so its cells must not collide with the
toy's (a shared key would train one of them from the wrong config), and the toy's keys keep
their format (study.json files written before part 4 still load).
"""

from __future__ import annotations

import pytest
from asyncopd.lab.study.plan import TOY, WIDE, Cell, StudyPlan, StudySize, parse_parts

pytestmark = pytest.mark.unit


def test_parts_accept_wide_as_part_4() -> None:
    assert parse_parts("wide") == (4,)
    assert parse_parts("1, wide,3") == (1, 3, 4)
    assert parse_parts("4,2") == (2, 4)
    for bad in ("5", "narrow", "", "0"):
        with pytest.raises(ValueError, match="4 = wide"):
            parse_parts(bad)


def test_part4_rows_are_sparse_k_mc_n_and_forward_k_at_their_lr() -> None:
    plan = StudyPlan(k=8, parts=(4,))
    rows = plan.part4_rows()
    assert [r.label.split(" (")[0] for r in rows] == [
        "sparse top-8",
        "sparse top-64",
        "MC N=1",
        "MC N=8",
        "MC N=64",
        "forward top-8",
        "forward top-64",
    ]
    assert all(r.world == WIDE for r in rows)
    assert "loss.k=64" in rows[4].overrides and "loss.correction=is" in rows[4].overrides
    assert rows[5].overrides == ("loss.kind=forward_kl_topk", "loss.k=8", "learner.lr=0.0001")
    assert all(not any(o.startswith("learner.lr") for o in r.overrides) for r in rows[:5])
    assert plan.staleness_of(4) == (plan.size.part3_staleness,)


def test_wide_cells_do_not_collide_with_the_toys() -> None:
    size = StudySize(seeds=(0, 1))
    plan = StudyPlan(k=8, size=size, parts=(3, 4))
    cells = plan.cells()
    wide = [c for c in cells if c.world == WIDE]
    toy = [c for c in cells if c.world == TOY]
    assert len(wide) == 7 * 2 and len(toy) == len(plan.part3_rows()) * 2
    assert len({c.key for c in cells}) == len(cells)
    # same overrides, same s, same seed: part 3's MC N=8 would be 'MC N=8' of part 4 without the world
    same = Cell(("loss.kind=reverse_kl_mc",), 1, 0)
    assert same.key == "loss.kind=reverse_kl_mc | s=1 | seed=0"
    assert Cell(same.overrides, 1, 0, WIDE).key == "loss.kind=reverse_kl_mc | s=1 | seed=0 | world=wide"
    assert plan.worlds == (TOY, WIDE) and StudyPlan(k=8).worlds == (TOY,)


def test_quick_size_keeps_the_wide_part_small() -> None:
    quick = StudySize.quick()
    assert quick.steps_of(WIDE) == 1 and quick.test_size_of(WIDE) == 2 and quick.wide_batch_size == 4
    assert quick.steps_of(TOY) == quick.steps == 3
    assert StudySize().steps_of(WIDE) == StudySize().wide_steps
