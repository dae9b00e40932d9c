"""Rollout replicas: the engine, sampling, and the per-position support they record."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.vllm import VLLMEngineConfig


class SamplingConfig(Section):
    """How the student samples rollouts."""

    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature (>0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    max_tokens: int = Field(64, ge=1, description="Largest number of generated tokens per response.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Strings that end a response.")


class RolloutConfig(Section):
    """A rollout replica."""

    server: ServerConfig = Field(
        default_factory=lambda: ServerConfig(port=50052), description="gRPC server of a rollout replica."
    )
    replicas: int = Field(1, ge=0, le=1024, description="Replicas `asyncopd run` starts locally.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Inference engine (simulated engines exist only inside `asyncopd bench fleet`).",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description=(
            "Prompts a replica keeps in flight (continuous: refilled as responses finish) or acquires and "
            "generates together (batches)."
        ),
    )
    continuous: bool = Field(
        True,
        description=(
            "Continuous batching where the engine can (vllm): each response is put as it finishes and new prompts "
            "are admitted between decode steps. False, or the transformers engine: whole batches."
        ),
    )
    pause_mode: Literal["keep", "abort"] = Field(
        "keep",
        description=(
            "What a weight update does to responses being generated: keep decoding them with the new weights "
            "(per-token versions record the switch) or abort and restart them from the prompt (vllm only)."
        ),
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters.")
    device: str = Field("cpu", description="torch device of the engine (cpu, cuda, cuda:1...).")
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Prompt + response tokens one sequence may hold; None = the model's max_position_embeddings.",
    )
    acquire_wait_ms: int = Field(
        20000,
        ge=0,
        le=60000,
        description="How long one AcquirePrompts call of an idle replica may wait at the cache for admission. Waits "
        "end at once on the cache's wake-ups (freed slots, a new version, the run's end) and on stopping, so a long "
        "wait costs no latency; it sets what an idle fleet costs the cache (one call per replica per wait).",
    )
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, description="vLLM engine settings.")
