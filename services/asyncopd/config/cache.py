"""Cache service: admission, queues, the finite teacher-score cache and versioned batches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncopd.config.base import Section
from asyncopd.config.endpoints import CacheServerConfig


class CacheConfig(Section):
    """The experience hub's policy knobs (Redis connection is `redis`)."""

    server: CacheServerConfig = Field(
        default_factory=CacheServerConfig, description="gRPC server of the cache service."
    )
    byte_budget_mb: float = Field(
        512.0,
        gt=0,
        description="Bytes of stored samples (rollouts, plus their teacher scores once scored) the cache may hold, "
        "in MiB. Keep it well below Redis's maxmemory.",
    )
    eviction: Literal["stalest-first", "lru", "fifo", "backpressure"] = Field(
        "stalest-first",
        description="What happens when the byte budget is full: stalest-first evicts scored samples that can no "
        "longer be used, then the oldest versions; lru the least recently stored/returned; fifo the first produced; "
        "backpressure refuses puts (RESOURCE_EXHAUSTED) until the learner consumes.",
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
    logprob_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description="Dtype the cache stores log-probs in (ids stay int32); float16 halves the bytes of float32.",
    )
    max_request_mb: float = Field(
        48.0,
        gt=0,
        description="Largest put request accepted, in MiB; larger ones get INVALID_ARGUMENT "
        "(keep it below server.max_message_mb, which gRPC itself enforces).",
    )
    max_items_per_request: int = Field(
        4096, ge=1, description="Most prompts, rollouts, scores or batch samples one request may ask for or carry."
    )
    max_wait_ms: int = Field(
        30000, ge=0, description="Longest server-side wait a request may ask for (longer waits are cut to this)."
    )
    poll_interval_ms: float = Field(
        250.0,
        gt=0,
        description="How often the cache process checks, once for all its waiting requests, whether a prompt lease, "
        "teacher claim or batch claim has expired (waits otherwise end on pub/sub wake-ups from the scripts that "
        "free admission slots or add work); while its wake-up subscription is down, every waiting request "
        "re-checks Redis on its own this often.",
    )
    payload_ttl_s: float = Field(
        600.0,
        gt=0,
        description="Payload frames written to Redis by rollout replicas and teachers expire after this long unless "
        "the cache accepted their metadata (a producer that crashed in between leaves nothing behind).",
    )
    direct_payloads: bool = Field(
        True,
        description="Rollout replicas, teachers and the learner read and write payload frames in Redis themselves "
        "(redis.url, credentials) and send the cache metadata only; false sends payloads through the cache "
        "(for producers that cannot reach Redis).",
    )
    max_deliveries: int = Field(
        5,
        gt=0,
        description="How many times one sample is handed to a teacher, and how many times it is claimed in a "
        "learner batch, before a lease or claim that runs out again drops it as 'poison' (a sample that crashes "
        "whoever takes it is not handed out forever). 1 means never re-delivered.",
    )
    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="Independent cache shards, each its own hash-tagged Redis keyspace with its own admission (its "
        "share of the window, at least one batch), teacher queue, byte budget (byte_budget_mb / shards) and "
        "accounting; on a Redis Cluster they spread over the masters. Puts go to the shard of their ticket, "
        "batches are taken from the shards round-robin. Needs direct_payloads.",
    )
    max_tokens_in_flight: int = Field(
        0,
        ge=0,
        description="Token budget of admission: tokens the rollout replicas may be generating at once. Each open "
        "admission ticket reserves rollout.sampling.max_tokens from it until its rollout is put (or it is released "
        "or its lease runs out); each shard keeps max_tokens_in_flight / shards. 0 = no token budget (the sample "
        "window, (max_staleness + 1) * learner.batch_size, applies either way).",
    )
    redis_retry_s: float = Field(
        30.0, gt=0, description="How long a request retries a lost Redis connection before failing UNAVAILABLE."
    )
    hold_until_learner: bool = Field(
        True,
        description="A cache process that creates the run state (a new run, or a Redis that lost everything while "
        "this process was down too) admits no prompts until a learner begins or hands back its checkpoint's "
        "prompt cursor: a process that started after Redis lost the state cannot tell a new run from a lost one, "
        "and admitting at position 0 of a run that trained it would train those prompts twice. False: admit at once "
        "(a cache driven without a learner, e.g. the benchmarks).",
    )

    @model_validator(mode="after")
    def _shards_need_direct_payloads(self) -> CacheConfig:
        if self.shards > 1 and not self.direct_payloads:
            raise ValueError(
                f"shards: {self.shards} needs direct_payloads: true (producers write each frame into its sample's "
                "shard; the inline path cannot tell a scores frame's shard)"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_message(self) -> CacheConfig:
        if self.max_request_mb > self.server.max_message_mb:
            raise ValueError(
                f"max_request_mb ({self.max_request_mb}) must not exceed server.max_message_mb "
                f"({self.server.max_message_mb}): gRPC would refuse larger requests first, with a less precise error"
            )
        return self
