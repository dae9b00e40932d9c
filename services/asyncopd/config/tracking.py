"""Experiment tracking: where the learner's step records go besides its JSONL step log."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from asyncopd.config.base import Section

TrackingBackend = Literal["tensorboard"]


class TrackingConfig(Section):
    """Backends fed from the learner's step records (loss, KL, staleness, IS ratios, phase
    times, evaluation); none by default. tensorboard needs the `tracking` extra."""

    backends: list[TrackingBackend] = Field(
        default_factory=list, description="Tracking backends: tensorboard (event files; offline, no account)."
    )
    directory: str | None = Field(
        None, description="Where backends write (tensorboard: event files); None = <output_dir>/tracking."
    )
    flush_every: int = Field(10, ge=1, description="Records between flushes to disk.")

    @field_validator("backends")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each backend at most once, got {value}")
        return value
