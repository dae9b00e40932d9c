"""The LR schedule against hand-written formulas, and the Trainer stepping along it."""

from __future__ import annotations

import math

import pytest
import torch
from asyncopd.config import load_config
from asyncopd.config.loader import ConfigError
from asyncopd.learner.lr_schedule import lr_multiplier
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss


def naive(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    # first step after warm-up -> 1.0, step total-1 -> floor
    t = min(1.0, (step - warmup) / (total - 1 - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * t
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * t)) / 2.0


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "floor"), [(0, 0.0), (5, 0.0), (5, 0.1), (1, 0.5)])
def test_matches_the_formula_at_every_step(schedule: str, warmup: int, floor: float) -> None:
    total = 40
    for step in range(total + 5):  # and past the end: stays at the floor
        got = lr_multiplier(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_ratio=floor)  # type: ignore[arg-type]
        assert got == pytest.approx(naive(step, warmup, total, schedule, floor), abs=1e-12), step


def test_end_points_and_shape() -> None:
    kw = {"warmup_steps": 4, "total_steps": 24, "min_ratio": 0.1}
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.25)  # type: ignore[arg-type]
    assert lr_multiplier(4, schedule="cosine", **kw) == pytest.approx(1.0)  # type: ignore[arg-type]
    assert lr_multiplier(23, schedule="cosine", **kw) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert lr_multiplier(14, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 10 / 19)  # type: ignore[arg-type]
    # cosine stays above linear in the first half of the decay
    assert lr_multiplier(8, schedule="cosine", **kw) > lr_multiplier(8, schedule="linear", **kw)  # type: ignore[arg-type]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        lr_multiplier(0, warmup_steps=0, total_steps=10, schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_ratio must be in"):
        lr_multiplier(0, warmup_steps=0, total_steps=10, schedule="linear", min_ratio=1.5)
    with pytest.raises(ConfigError, match=r"learner\.lr_schedule"):
        load_config(None, ["learner.lr_schedule=exponential"])
    with pytest.raises(ConfigError, match=r"learner\.min_lr_ratio"):
        load_config(None, ["learner.min_lr_ratio=-0.1"])


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def test_the_trainer_applies_it_per_optimizer_step_and_restores_it_from_its_state() -> None:
    def trainer() -> Trainer:
        return Trainer(
            _Linear(),
            OPDLoss("forward_kl_topk"),
            lr=1e-3,
            warmup_steps=2,
            lr_schedule="cosine",
            total_steps=10,
            min_lr_ratio=0.2,
        )

    first = trainer()
    lrs = []
    for _ in range(6):
        lrs.append(first.optimizer.param_groups[0]["lr"])
        first.optimizer.step()
        first.scheduler.step()
    expected = [1e-3 * naive(s, 2, 10, "cosine", 0.2) for s in range(6)]
    assert lrs == pytest.approx(expected)
    resumed = trainer()
    resumed.load_state_dict(
        {"version": 6, "optimizer": first.optimizer.state_dict(), "scheduler": first.scheduler.state_dict()}
    )
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * naive(6, 2, 10, "cosine", 0.2))
