"""Cache service: admission, queues, the finite teacher-score cache and versioned batches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig


class CacheConfig(Section):
    """The experience hub's policy knobs (Redis connection is `redis`)."""

    server: ServerConfig = Field(
        default_factory=lambda: ServerConfig(port=50051), description="gRPC server of the cache service."
    )
    byte_budget_mb: float = Field(512.0, gt=0, description="Bytes of scored samples the cache may hold, in MiB.")
    eviction: Literal["stalest-first", "lru", "fifo", "backpressure"] = Field(
        "stalest-first", description="What happens when the byte budget is full."
    )
    teacher_lease_s: float = Field(
        30.0, gt=0, description="A teacher's claim on a rollout is re-delivered after this long."
    )
    prompt_lease_s: float = Field(
        120.0, gt=0, description="An admitted prompt not returned as a rollout is re-issued after this long."
    )
    batch_claim_s: float = Field(
        120.0, gt=0, description="A pulled batch not acked is returned to the pool after this long."
    )
    order: Literal["oldest-first", "newest-first"] = Field(
        "oldest-first", description="Which eligible samples a batch takes first."
    )
