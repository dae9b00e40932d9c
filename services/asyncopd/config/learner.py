"""The learner: optimizer, batches, checkpoints, evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig

# LR after warm-up (asyncopd.learner.lr_schedule has the formulas).
LRSchedule = Literal["constant", "linear", "cosine"]
# Training dtypes; float16 is left out on purpose (it needs loss scaling, which the learner lacks).
TrainDType = Literal["float32", "bfloat16"]


class LearnerConfig(Section):
    """The training loop."""

    server: ServerConfig = Field(
        default_factory=lambda: ServerConfig(port=50054), description="gRPC server of the learner."
    )
    steps: int = Field(100, ge=1, description="Optimizer versions to train (version = steps taken).")
    batch_size: int = Field(32, ge=1, description="Samples per pulled batch.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per pulled batch (paper setup).")
    micro_batch_size: int = Field(8, ge=1, description="Samples per forward/backward (memory bound).")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps.")
    lr_schedule: LRSchedule = Field(
        "constant",
        description="LR after warm-up: constant, or a linear or cosine decay to min_lr_ratio x lr at the last step.",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Where a linear or cosine decay ends, as a fraction of lr."
    )
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    param_dtype: TrainDType = Field(
        "float32",
        description=(
            "Dtype of the weights the optimizer steps and of the AdamW state (float32 = fp32 master weights; "
            "the model is cast to it after loading)."
        ),
    )
    compute_dtype: TrainDType = Field(
        "float32",
        description=(
            "Dtype of forward and backward: bfloat16 with param_dtype float32 runs them under torch autocast "
            "(bf16 matmuls, fp32 master weights, gradients and optimizer state); never wider than param_dtype."
        ),
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward instead of keeping them."
    )
    logit_chunk_tokens: int = Field(
        0,
        ge=0,
        description=(
            "Response positions per LM-head chunk: the estimator projects hidden states to logits this many "
            "positions at a time (forward and, recomputed, backward), so no [tokens, V] logits tensor exists; "
            "0 = one [tokens, V] logits tensor per micro-batch."
        ),
    )
    max_tokens_per_micro_batch: int = Field(
        0,
        ge=0,
        description=(
            "Token budget of one forward/backward: micro-batches take as many consecutive rows as fit it "
            "(padded: rows x longest; packed: the sum of lengths) and micro_batch_size does not apply; a row "
            "over the budget goes alone. 0 = micro_batch_size rows per micro-batch."
        ),
    )
    pack_sequences: bool = Field(
        False,
        description=(
            "Concatenate a micro-batch's rows into one unpadded row (position ids restart per row; attention "
            "stays within a row). Needs max_tokens_per_micro_batch."
        ),
    )
    device: str = Field("cpu", description="torch device of the learner.")
    world_size: int = Field(
        1,
        ge=1,
        description=(
            "Learner processes: > 1 shards weights, gradients and AdamW state with FSDP2 over this many ranks "
            "(gloo on CPU, NCCL on CUDA, one GPU each). Rank 0 serves; a local run starts the other ranks "
            "itself, a StatefulSet sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT per pod."
        ),
    )
    checkpoint_dir: str = Field("runs/latest/checkpoints", description="Where checkpoints are written.")
    checkpoint_every: int = Field(
        50,
        ge=0,
        description=(
            "Checkpoint every N steps, and always on exit/SIGTERM (0 = only then); what a crash can lose and "
            "where `asyncopd run --resume` continues from. Batches are acked (counted trained) only by the "
            "checkpoint that saves them; with 0 each batch is acked right after training instead."
        ),
    )
    eval_every: int = Field(0, ge=0, description="Evaluate greedy test accuracy every N steps (0 = off).")
    eval_size: int = Field(200, ge=1, description="Test prompts per evaluation.")
    resume: bool = Field(
        False, description="Continue from the newest checkpoint in checkpoint_dir (same version, optimizer, RNG)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    pull_wait_ms: int = Field(1000, ge=0, le=60000, description="Longest server-side wait of one batch pull, in ms.")
    log_sample_ids: bool = Field(
        False, description="Write every step's sample ids into the step log (for `asyncopd chaos`'s checks)."
    )
    step_log: str | None = Field(
        None,
        description=(
            "Per-step JSONL log (loss, KL, ratios, staleness, time split); default <output_dir>/learner_steps.jsonl."
        ),
    )

    @model_validator(mode="after")
    def _memory_settings_agree(self) -> LearnerConfig:
        if self.param_dtype == "bfloat16" and self.compute_dtype == "float32":
            raise ValueError(
                "learner.compute_dtype float32 is wider than learner.param_dtype bfloat16: "
                "compute in the weights' dtype or narrower"
            )
        if self.pack_sequences and not self.max_tokens_per_micro_batch:
            raise ValueError(
                "learner.pack_sequences needs learner.max_tokens_per_micro_batch > 0 (the packed row's token budget)"
            )
        return self
