"""One learner update: recompute the student on a scored batch, apply the OPD estimator, step.

`Trainer.train(samples)` runs `mini_batches` optimizer steps on one pulled batch (the paper's
setup), each accumulating gradients over micro-batches of at most `micro_batch_size` samples,
then clips the global gradient norm and steps AdamW under a linear-warm-up LR schedule. Every
optimizer step bumps `version` by one (version = optimizer steps taken).

Student logits are computed only at response positions: the decoder's hidden states are
gathered there before the output projection, so [B, T, V] (not [B, L, V]) is materialised.
For `correction="decoupled"` the proximal log-probs are a no-grad snapshot of the student
taken before the batch's first optimizer step. For the kinds that need dense teacher logits
(`EstimatorSpec.needs_teacher_logits`) a colocated teacher model gives them.

`trainer_from_config` is the one mapping from the run config's `loss` and `learner` sections
to a Trainer (the learner service and `asyncopd study` both build theirs with it).

It knows models, optimizers and the estimator front; it knows nothing of caches, gRPC or files.
"""

from __future__ import annotations

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
from asyncopd.learner.batching import TrainBatch, collate
from asyncopd.learner.lr_schedule import lr_multiplier
from asyncopd.opd import LossInputs, OPDLoss, gather_logprobs
from asyncopd.records import ScoredSample

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


def response_logits(model: nn.Module, batch: TrainBatch) -> Tensor:
    """Logits [B, T, V] at the positions that score each response token."""
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    index = batch.logit_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    logits: Tensor = head(hidden.gather(1, index))
    return logits


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
    ) -> None:
        if loss.spec.needs_teacher_logits and teacher is None:
            raise ValueError(f"loss.kind={loss.kind} needs dense teacher logits: pass a colocated teacher model")
        self.model = model
        self.loss = loss
        self.device = torch.device(device)
        self.teacher = teacher
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.mini_batches = mini_batches
        self.pad_id = pad_id
        self.version = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        # (LambdaLR evaluates step 0 here: a bad schedule or ratio fails at construction)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=lr_schedule, min_ratio=min_lr_ratio
            ),
        )

    def named_weights(self) -> list[tuple[str, Tensor]]:
        """The student's weights in HF naming (what the rollout engines load)."""
        return list(self.model.state_dict().items())

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def train(self, samples: Sequence[ScoredSample]) -> list[StepStats]:
        """Up to `mini_batches` optimizer steps on `samples` (fewer if the batch is smaller)."""
        batch = collate(samples, self.loss.kind, self.pad_id).to(self.device)
        proximal = self._proximal(batch) if self.loss.correction == "decoupled" else None
        steps = min(self.mini_batches, batch.size)
        bounds = [round(i * batch.size / steps) for i in range(steps + 1)]
        return [self._step(batch, proximal, lo, hi) for lo, hi in itertools.pairwise(bounds)]

    @torch.no_grad()
    def _proximal(self, batch: TrainBatch) -> Tensor:
        assert batch.ids is not None
        parts = []
        for lo in range(0, batch.size, self.micro_batch_size):
            micro = batch.slice(lo, lo + self.micro_batch_size)
            assert micro.ids is not None
            parts.append(gather_logprobs(response_logits(self.model, micro), micro.ids).float())
        return torch.cat(parts)

    def _step(self, batch: TrainBatch, proximal: Tensor | None, lo: int, hi: int) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mini = batch.slice(lo, hi)
        total = max(mini.tokens, 1)
        sums: dict[str, float] = {}
        for start in range(0, mini.size, self.micro_batch_size):
            micro = mini.slice(start, start + self.micro_batch_size)
            tokens = micro.tokens
            if tokens == 0:
                continue
            out = self.loss(self._inputs(micro, proximal, lo + start))
            # token mean over the whole mini-batch = Σ_micro (micro mean x micro tokens / total)
            (out.loss * (tokens / total)).backward()
            for name, value in out.metrics.items():
                if name in _MIN:
                    sums[name] = min(sums.get(name, math.inf), value)
                elif name in _MAX:
                    sums[name] = max(sums.get(name, -math.inf), value)
                elif name == "valid_tokens":
                    sums[name] = sums.get(name, 0.0) + value
                else:
                    sums[name] = sums.get(name, 0.0) + value * tokens / total
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        return StepStats(
            version=self.version, samples=mini.size, tokens=mini.tokens, lr=lr, grad_norm=grad_norm, metrics=sums
        )

    def _inputs(self, micro: TrainBatch, proximal: Tensor | None, offset: int) -> LossInputs:
        teacher_logits = None
        if self.teacher is not None and self.loss.spec.needs_teacher_logits:
            with torch.no_grad():
                teacher_logits = response_logits(self.teacher, micro)
        return LossInputs(
            student_logits=response_logits(self.model, micro),
            valid=micro.valid,
            ids=micro.ids,
            teacher_logprobs=micro.teacher_logprobs,
            behavior_logprobs=micro.behavior_logprobs,
            proximal_logprobs=None if proximal is None else proximal[offset : offset + micro.size],
            teacher_logits=teacher_logits,
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
    )


def trainer_from_config(
    config: RunConfig, model: nn.Module, *, pad_id: int, teacher: nn.Module | None = None
) -> Trainer:
    """The Trainer and its OPDLoss as the run config's `loss` and `learner` sections describe them."""
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
    )
