"""One learner update: recompute the student on a scored batch, apply the OPD estimator, step.

`Trainer.train(samples)` runs `mini_batches` optimizer steps on one pulled batch (the paper's
setup), each accumulating gradients over micro-batches of at most `micro_batch_size` samples,
then clips the global gradient norm and steps AdamW under a linear-warm-up LR schedule. Every
optimizer step bumps `version` by one (version = optimizer steps taken).

Student logits are computed only at response positions: the decoder's hidden states are
gathered there before the output projection, so [B, T, V] (not [B, L, V]) is materialised —
or, with `logit_chunk_tokens` set, nothing of size V at all: the hidden states and the LM
head go to the estimator as `ProjectedLogits`, which it evaluates a chunk of positions at a
time (same loss and gradients to floating-point tolerance; `asyncopd.opd.head`).
For `correction="decoupled"` the proximal log-probs are a no-grad snapshot of the student
taken before the batch's first optimizer step. For the kinds that need dense teacher logits
(`EstimatorSpec.needs_teacher_logits`) a colocated teacher model gives them.

Memory knobs: `param_dtype` is the dtype of the weights the optimizer steps and of AdamW's
state (fp32 masters by default); a narrower `compute_dtype` runs forward and backward under
torch autocast (matmuls in bf16, gradients accumulated into the fp32 parameters); activation
checkpointing recomputes each decoder layer in backward (Hugging Face's
`gradient_checkpointing_enable`); a token budget (`max_tokens_per_micro_batch`) forms
micro-batches by tokens instead of rows, and `pack_sequences` concatenates their rows into one
unpadded row (`asyncopd.learner.batching`).

Over several processes (`lockstep`, `asyncopd.learner.distributed`) the model is FSDP2-sharded
before the optimizer is built, every rank collates the whole batch and runs its round-robin
share of the micro-batches inside the sharded model's forward method, and losses, gradients
and metrics add up to the one-process update.

`trainer_from_config` is the one mapping from the run config's `loss` and `learner` sections
to a Trainer (the learner service and `asyncopd study` both build theirs with it).

It knows models, optimizers and the estimator front; it knows nothing of caches, gRPC or files.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asyncopd.config.learner import LRSchedule
from asyncopd.config.loss import EstimatorKind, LossConfig
from asyncopd.config.run import RunConfig
from asyncopd.learner import distributed
from asyncopd.learner.batching import TrainBatch, collate, pack_positions, plan_micro_batches, unpack_positions
from asyncopd.learner.lr_schedule import lr_multiplier
from asyncopd.models.loading import torch_dtype
from asyncopd.opd import Logits, LossInputs, LossOutputs, OPDLoss, ProjectedLogits, gather_logprobs
from asyncopd.records import ScoredSample
from asyncopd.weightsync.gather import GatheredWeights

# metrics that combine across micro-batches by min / max rather than a token-weighted mean
_MIN = {"ratio_min"}
_MAX = {"ratio_max"}


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    version: int
    samples: int
    tokens: int
    lr: float
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)


def response_hidden(model: nn.Module, batch: TrainBatch) -> Tensor:
    """The decoder's last hidden states [B, T, H] at the positions that score each response token.

    A packed batch goes in with its position ids and no attention mask, which Hugging Face
    models read as packed sequences (attention stays inside each one).
    """
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    mask = None if batch.packed else batch.attention_mask
    out = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)
    hidden: Tensor = out.last_hidden_state
    index = batch.logit_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def response_logits(model: nn.Module, batch: TrainBatch) -> Tensor:
    """Logits [B, T, V] at the positions that score each response token."""
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    logits: Tensor = head(response_hidden(model, batch))
    return logits


def projected_response_logits(
    model: nn.Module, batch: TrainBatch, chunk_positions: int, matmul_dtype: torch.dtype | None = None
) -> ProjectedLogits:
    """`response_logits` as hidden states + the model's LM head, for the chunked estimators."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"learner.logit_chunk_tokens needs an nn.Linear output projection, got {type(head).__name__}; "
            "set learner.logit_chunk_tokens: 0"
        )
    return ProjectedLogits(response_hidden(model, batch), head.weight, head.bias, chunk_positions, matmul_dtype)


class Trainer:
    """The student, its optimizer and LR schedule, and the estimator; `version` counts steps."""

    def __init__(
        self,
        model: nn.Module,
        loss: OPDLoss,
        *,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        total_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 8,
        mini_batches: int = 1,
        device: torch.device | str = "cpu",
        teacher: nn.Module | None = None,
        pad_id: int = 0,
        param_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        activation_checkpointing: bool = False,
        logit_chunk_tokens: int = 0,
        max_tokens_per_micro_batch: int = 0,
        pack_sequences: bool = False,
        lockstep: distributed.Lockstep | None = None,
        sync_dtype: torch.dtype | None = None,
        mask_stale_tokens_beyond: int | None = None,
    ) -> None:
        """`lockstep`: this process's rank when the learner runs over several (the model is sharded here);
        `sync_dtype`: the dtype `named_weights` delivers (the rollout engines'; None = the weights' own);
        `mask_stale_tokens_beyond`: max_staleness under stale_tokens: mask (tokens more than that many
        versions behind the version a batch is trained at are masked; None = no per-token mask)."""
        if loss.spec.needs_teacher_logits and teacher is None:
            raise ValueError(f"loss.kind={loss.kind} needs dense teacher logits: pass a colocated teacher model")
        check_memory_settings(
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            logit_chunk_tokens=logit_chunk_tokens,
            max_tokens_per_micro_batch=max_tokens_per_micro_batch,
            pack_sequences=pack_sequences,
        )
        if param_dtype is not None:
            # the optimizer is built on these parameters below, so its state takes their dtype
            model.to(dtype=param_dtype)
        if activation_checkpointing:
            enable = getattr(model, "gradient_checkpointing_enable", None)
            if enable is None:
                raise ValueError(
                    f"learner.activation_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable"
                )
            # non-reentrant: works with inputs that need no grad and with autocast
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lockstep is not None:
            distributed.shard(model)  # before the optimizer: it must hold the sharded parameters
        self.lockstep = lockstep
        self.sync_dtype = sync_dtype
        self.model = model
        self.loss = loss
        self.device = torch.device(device)
        self.teacher = teacher
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.mini_batches = mini_batches
        self.pad_id = pad_id
        self.mask_stale_tokens_beyond = mask_stale_tokens_beyond
        self.logit_chunk_tokens = logit_chunk_tokens
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.pack_sequences = pack_sequences
        weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if compute_dtype is not None and compute_dtype.itemsize > weights_dtype.itemsize:
            raise ValueError(
                f"learner.compute_dtype {compute_dtype} is wider than the model's weights ({weights_dtype}): "
                "set learner.param_dtype to at least as wide"
            )
        # autocast only when compute is narrower than the stored weights (fp32 masters, bf16 math)
        self.autocast_dtype = compute_dtype if compute_dtype not in (None, weights_dtype) else None
        self.version = 0
        # The prompt cursor state (asyncopd.wire.cache_client.CursorState.as_dict) the loop
        # records in each checkpoint, so a resumed run continues the prompt feed; None before one.
        self.prompt_cursor: dict[str, Any] | None = None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        # (LambdaLR evaluates step 0 here: a bad schedule or ratio fails at construction)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=lr_schedule, min_ratio=min_lr_ratio
            ),
        )

    def named_weights(self) -> GatheredWeights:
        """The student's weights in HF naming (what the rollout engines load), each tensor once, in
        `sync_dtype`; sharded ones are gathered one at a time as the transport packs them (rank 0
        tells the other ranks to join each gather)."""
        lockstep = self.lockstep
        return GatheredWeights(
            list(self.model.state_dict(keep_vars=True).items()),
            self.sync_dtype,
            None if lockstep is None else lambda: lockstep.lead(distributed.Op.GATHER),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"prompt_cursor": self.prompt_cursor} if self.prompt_cursor is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.prompt_cursor = state.get("prompt_cursor")  # absent in checkpoints older than it
        if "optimizer" in state:  # absent in a sharded checkpoint: `checkpoint.load_sharded` loads it
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def train(self, samples: Sequence[ScoredSample]) -> list[StepStats]:
        """Up to `mini_batches` optimizer steps on `samples` (fewer if the batch is smaller)."""
        if self.lockstep is not None:
            self.lockstep.lead(distributed.Op.TRAIN, list(samples))
        eta = self.mask_stale_tokens_beyond
        oldest_usable = None if eta is None else self.version - eta  # StalenessPolicy.oldest_usable
        batch = collate(samples, self.loss.kind, self.pad_id, oldest_usable).to(self.device)
        masked = 0 if oldest_usable is None else sum(s.rollout.num_tokens for s in samples) - batch.tokens
        proximal = self._proximal(batch) if self.loss.correction == "decoupled" else None
        steps = min(self.mini_batches, batch.size)
        bounds = [round(i * batch.size / steps) for i in range(steps + 1)]
        stats = [self._step(batch, proximal, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        if oldest_usable is not None:
            stats[0].metrics["masked_stale_tokens"] = float(masked)
        return stats

    def micro_batches(self, batch: TrainBatch, lo: int, hi: int) -> list[tuple[int, int]]:
        """Row ranges of rows lo:hi, one per forward/backward (by rows, or by the token budget)."""
        return plan_micro_batches(
            batch.lengths(),
            lo,
            hi,
            max_rows=self.micro_batch_size,
            max_tokens=self.max_tokens_per_micro_batch,
            packed=self.pack_sequences,
        )

    def _micro(self, batch: TrainBatch, start: int, stop: int) -> TrainBatch:
        micro = batch.slice(start, stop)
        return micro.pack() if self.pack_sequences else micro

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the compute dtype when it is narrower than the weights; else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def _proximal(self, batch: TrainBatch) -> Tensor:
        """log π_prox at every row's ids, [B, T, K] as the batch is padded."""
        assert batch.ids is not None
        out = torch.zeros(batch.ids.shape, dtype=torch.float32, device=batch.ids.device)
        for start, stop, real in self._share(batch, 0, batch.size):
            micro = self._micro(batch, start, stop)
            ids = micro.ids
            assert ids is not None

            def logprobs(micro: TrainBatch = micro, ids: Tensor = ids) -> Tensor:
                with self._compute():
                    logits = self._student_logits(micro)
                return gather_logprobs(logits, ids).float()

            rows_logprobs = distributed.run(self.model, logprobs)
            if real:
                rows = batch.valid[start:stop]
                out[start:stop] = unpack_positions(rows_logprobs, rows) if micro.packed else rows_logprobs
        return out if self.lockstep is None else self.lockstep.sum_(out)

    def _share(self, batch: TrainBatch, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """This process's micro-batches of rows lo:hi, (start, stop, real): all of them, real, on one
        process; over several, its round-robin share of the non-empty ones plus zero-weight dummies."""
        ranges = self.micro_batches(batch, lo, hi)
        if self.lockstep is None:
            return [(start, stop, True) for start, stop in ranges]
        lengths = batch.lengths()
        # an empty micro-batch would skip collectives on one rank only: leave them out everywhere
        return self.lockstep.assign([(a, b) for a, b in ranges if sum(lengths[a:b]) > 0])

    def _step(self, batch: TrainBatch, proximal: Tensor | None, lo: int, hi: int) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mini = batch.slice(lo, hi)
        total = max(mini.tokens, 1)
        sums: dict[str, float] = {}
        scale = 1.0 if self.lockstep is None else self.lockstep.grad_scale
        for start, stop, real in self._share(batch, lo, hi):
            micro = self._micro(batch, start, stop)
            tokens = micro.tokens if real else 0
            if tokens == 0 and self.lockstep is None:
                continue
            rows_proximal = None
            if proximal is not None:
                rows_proximal = proximal[start:stop]
                if micro.packed:
                    rows_proximal = pack_positions(rows_proximal, batch.valid[start:stop])

            def forward(micro: TrainBatch = micro, rows_proximal: Tensor | None = rows_proximal) -> LossOutputs:
                with self._compute():
                    inputs = self._inputs(micro, rows_proximal)
                return self.loss(inputs)

            out = distributed.run(self.model, forward)
            # token mean over the whole mini-batch = Σ_micro (micro mean x micro tokens / total);
            # a dummy (tokens 0) only keeps this rank's collectives in step with the others
            (out.loss * (tokens / total * scale)).backward()
            if not real:
                for name in out.metrics:
                    sums.setdefault(name, math.inf if name in _MIN else -math.inf if name in _MAX else 0.0)
                continue
            for name, value in out.metrics.items():
                if name in _MIN:
                    sums[name] = min(sums.get(name, math.inf), value)
                elif name in _MAX:
                    sums[name] = max(sums.get(name, -math.inf), value)
                elif name == "valid_tokens":
                    sums[name] = sums.get(name, 0.0) + value
                else:
                    sums[name] = sums.get(name, 0.0) + value * tokens / total
        if self.lockstep is not None:
            sums = self.lockstep.reduce_metrics(sums, _MIN, _MAX)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        full = getattr(norm, "full_tensor", None)  # sharded gradients: a DTensor norm
        grad_norm = float(full() if full is not None else norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        return StepStats(
            version=self.version, samples=mini.size, tokens=mini.tokens, lr=lr, grad_norm=grad_norm, metrics=sums
        )

    def _student_logits(self, micro: TrainBatch) -> Logits:
        if self.logit_chunk_tokens:
            return projected_response_logits(self.model, micro, self.logit_chunk_tokens, self.autocast_dtype)
        return response_logits(self.model, micro)

    def _inputs(self, micro: TrainBatch, proximal: Tensor | None) -> LossInputs:
        """The loss inputs of one micro-batch (run under the compute dtype's autocast)."""
        teacher_logits: Logits | None = None
        if self.teacher is not None and self.loss.spec.needs_teacher_logits:
            with torch.no_grad():
                if self.logit_chunk_tokens:
                    teacher_logits = projected_response_logits(
                        self.teacher, micro, self.logit_chunk_tokens, self.autocast_dtype
                    )
                else:
                    teacher_logits = response_logits(self.teacher, micro)
        return LossInputs(
            student_logits=self._student_logits(micro),
            valid=micro.valid,
            ids=micro.ids,
            teacher_logprobs=micro.teacher_logprobs,
            behavior_logprobs=micro.behavior_logprobs,
            proximal_logprobs=proximal,
            teacher_logits=teacher_logits,
        )


def check_memory_settings(
    *,
    param_dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None,
    logit_chunk_tokens: int,
    max_tokens_per_micro_batch: int,
    pack_sequences: bool,
) -> None:
    """ValueError, naming the `learner.*` field, for a combination the trainer cannot run."""
    if logit_chunk_tokens < 0:
        raise ValueError(f"learner.logit_chunk_tokens must be >= 0 (0 = off), got {logit_chunk_tokens}")
    if max_tokens_per_micro_batch < 0:
        raise ValueError(f"learner.max_tokens_per_micro_batch must be >= 0 (0 = off), got {max_tokens_per_micro_batch}")
    if pack_sequences and not max_tokens_per_micro_batch:
        raise ValueError(
            "learner.pack_sequences needs learner.max_tokens_per_micro_batch > 0 (the packed row's budget)"
        )
    for name, dtype in (("param_dtype", param_dtype), ("compute_dtype", compute_dtype)):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"learner.{name} must be a floating-point dtype, got {dtype}")
    if param_dtype is not None and compute_dtype is not None and compute_dtype.itemsize > param_dtype.itemsize:
        raise ValueError(
            f"learner.compute_dtype {compute_dtype} is wider than learner.param_dtype {param_dtype}: "
            "compute in the weights' dtype or narrower"
        )


def loss_from_config(lc: LossConfig, kind: EstimatorKind | None = None) -> OPDLoss:
    """The OPDLoss of the config's `loss` section (`kind` overrides its estimator, keeping the knobs)."""
    return OPDLoss(
        kind or lc.kind,
        tail=lc.tail,
        advantage=lc.advantage,
        correction=lc.correction,
        clip_eps=lc.clip_eps,
        behavior_weight_cap=lc.behavior_weight_cap,
        m2po_tau=lc.m2po_tau,
        decoupled_mode=lc.decoupled_mode,
        m2po_budget=lc.m2po_budget,
        baseline=lc.baseline,
    )


def trainer_from_config(
    config: RunConfig,
    model: nn.Module,
    *,
    pad_id: int,
    teacher: nn.Module | None = None,
    lockstep: distributed.Lockstep | None = None,
) -> Trainer:
    """The Trainer and its OPDLoss as the run config's `loss` and `learner` sections describe them
    (`lockstep`: this process's rank when `learner.world_size` > 1)."""
    lc = config.learner
    return Trainer(
        model,
        loss_from_config(config.loss),
        lr=lc.lr,
        weight_decay=lc.weight_decay,
        warmup_steps=lc.warmup_steps,
        lr_schedule=lc.lr_schedule,
        total_steps=lc.steps,
        min_lr_ratio=lc.min_lr_ratio,
        grad_clip=lc.grad_clip,
        micro_batch_size=lc.micro_batch_size,
        mini_batches=lc.mini_batches,
        device=lc.device,
        teacher=teacher,
        pad_id=pad_id,
        param_dtype=torch_dtype(lc.param_dtype),
        compute_dtype=torch_dtype(lc.compute_dtype),
        activation_checkpointing=lc.activation_checkpointing,
        logit_chunk_tokens=lc.logit_chunk_tokens,
        max_tokens_per_micro_batch=lc.max_tokens_per_micro_batch,
        pack_sequences=lc.pack_sequences,
        lockstep=lockstep,
        sync_dtype=torch_dtype(config.models.dtype),
        mask_stale_tokens_beyond=config.max_staleness if config.stale_tokens == "mask" else None,
    )
