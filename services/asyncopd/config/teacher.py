"""Teacher scoring replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig


class TeacherVLLMConfig(Section):
    """Settings of the vLLM teacher engine (teacher.backend: vllm); defaults suit a real model on a GPU."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one engine shards the teacher over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of each GPU's memory vLLM may take (weights + KV cache)."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Prompt + response tokens + 1 one sequence may hold; None = the model's maximum."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (and torch.compile): slower, starts faster.")
    enable_prefix_caching: bool = Field(
        True, description="Share the KV cache of common prompt prefixes (rollouts of one prompt score it once)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights and activations of the teacher engine; None = models.dtype."
    )


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
        500, ge=0, le=60000, description="How long one ClaimRollouts call may wait at the cache for work."
    )
    vllm: TeacherVLLMConfig = Field(default_factory=TeacherVLLMConfig, description="vLLM teacher engine settings.")
