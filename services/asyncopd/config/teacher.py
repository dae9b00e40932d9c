"""Teacher scoring replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.vllm import VLLMEngineConfig


class TeacherConfig(Section):
    """A teacher replica: prefill-only scoring of rollouts."""

    server: ServerConfig = Field(
        default_factory=lambda: ServerConfig(port=50053), description="gRPC server of a teacher replica."
    )
    replicas: int = Field(1, ge=0, le=1024, description="Replicas `asyncopd run` starts locally.")
    backend: Literal["torch", "vllm"] = Field(
        "torch",
        description=(
            "Scoring backend: torch (transformers prefill on teacher.device) or vllm (prefill in a vLLM engine, "
            "log-probs reduced inside it; settings in teacher.vllm). Dense-logit estimators (*_full) need torch."
        ),
    )
    max_batch_tokens: int = Field(
        8192, ge=1, description="Tokens scored in one forward pass (vllm: the engine's max_num_batched_tokens)."
    )
    topk: int = Field(
        8,
        ge=0,
        description="Teacher top-K ids per position (0 = none); loss.kind forward_kl_topk uses loss.k instead.",
    )
    device: str = Field("cpu", description="torch device of the teacher (backend torch).")
    tail: bool = Field(True, description="Also return the tail log-mass log(1 - Σ top-K p) (needs topk >= 1).")
    claim_batch: int = Field(32, ge=1, description="Rollouts a teacher claims from the cache at once.")
    claim_wait_ms: int = Field(
        20000,
        ge=0,
        le=60000,
        description="How long one ClaimRollouts call may wait at the cache for work. Waits end at once when "
        "rollouts arrive (a wake-up) and on stopping; a long wait only makes an idle teacher cheaper.",
    )
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, description="vLLM teacher engine settings.")
