"""The settings of one vLLM engine, the same block for the rollout (`rollout.vllm`) and the
teacher (`teacher.vllm`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section


class VLLMEngineConfig(Section):
    """Settings of a vLLM engine (rollout.engine: vllm, teacher.backend: vllm); defaults suit a real
    model on a GPU."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one engine shards the model over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of each GPU's memory vLLM may take (weights + KV cache)."
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Tokens one sequence may hold; None = rollout.max_model_len (rollout), the model's maximum "
        "(teacher).",
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (and torch.compile): slower, starts faster.")
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of shared prompt prefixes (the rollout resets it after every weight load; "
        "the teacher scores a prompt's rollouts over one prefix).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights and activations of the engine; None = models.dtype."
    )
