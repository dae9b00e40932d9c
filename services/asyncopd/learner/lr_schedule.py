"""The learning-rate schedule: linear warm-up, then constant, or a linear or cosine decay that
reaches `min_ratio` x the peak at the last step (`learner.steps`). Pure: the multiplier of the
peak LR for each optimizer step, which the Trainer hands to torch's LambdaLR.
"""

from __future__ import annotations

import math
from typing import get_args

from asyncopd.config.learner import LRSchedule

SCHEDULES: tuple[str, ...] = get_args(LRSchedule)


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: LRSchedule = "constant", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based: the step about to be taken).

    Warm-up: (step + 1) / warmup_steps for the first `warmup_steps` steps. Then 1.0 (constant),
    or decay from 1.0 at the first step after warm-up to `min_ratio` at step total_steps - 1:
    linearly, or along half a cosine. Steps past the end (a resumed run given more steps) stay
    at `min_ratio`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps - 1  # steps from the first after warm-up to the last
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
