"""Scored samples -> padded training tensors for one estimator kind.

A sample is the sequence prompt + response; the student's logits that score response token t
sit at sequence position P - 1 + t. `collate` right-pads a list of samples into one
`TrainBatch` holding exactly what the configured estimator needs (teacher top-K for forward
KL, the behaviour student's top-K for sparse reverse KL, N MC samples with behaviour log-probs
for MC reverse KL) and fails loudly, naming the sample and field, when a sample lacks it.

It knows samples and tensors; it knows nothing of models, optimizers or services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from asyncopd.opd import EstimatorSpec, Support, estimator_spec
from asyncopd.records import ScoredSample, SupportKind

# what the rollout must have recorded for an estimator whose ids it supplies
_ROLLOUT_SUPPORT = {Support.STUDENT_TOPK: SupportKind.STUDENT_TOPK, Support.MC_SAMPLES: SupportKind.MC_SAMPLES}


@dataclass(frozen=True)
class TrainBatch:
    """Right-padded tensors of B samples; T = longest response, L = longest sequence."""

    input_ids: Tensor  # int64 [B, L]
    attention_mask: Tensor  # int64 [B, L]
    logit_index: Tensor  # int64 [B, T]: sequence position whose logits score response token t
    valid: Tensor  # bool [B, T]
    ids: Tensor | None  # int64 [B, T, K]
    teacher_logprobs: Tensor | None  # float32 [B, T, K]
    behavior_logprobs: Tensor | None  # float32 [B, T, K]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> TrainBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return TrainBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            logit_index=self.logit_index.to(device),
            valid=self.valid.to(device),
            ids=move(self.ids),
            teacher_logprobs=move(self.teacher_logprobs),
            behavior_logprobs=move(self.behavior_logprobs),
        )

    def slice(self, start: int, stop: int) -> TrainBatch:
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]

        return TrainBatch(
            input_ids=self.input_ids[start:stop],
            attention_mask=self.attention_mask[start:stop],
            logit_index=self.logit_index[start:stop],
            valid=self.valid[start:stop],
            ids=cut(self.ids),
            teacher_logprobs=cut(self.teacher_logprobs),
            behavior_logprobs=cut(self.behavior_logprobs),
        )


def _per_position(
    samples: Sequence[ScoredSample], spec: EstimatorSpec
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None:
    """(ids [T,K], teacher log-probs [T,K], behaviour log-probs [T,K] or None) per sample."""
    if spec.support is Support.DENSE:
        return None  # dense teacher logits come from the learner's colocated teacher
    kind = spec.kind
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    for s in samples:
        r, sc = s.rollout, s.scores
        where = f"sample {r.sample_id!r}"
        if spec.support is Support.TEACHER_TOPK:
            if sc.topk_ids is None or sc.topk_logprobs is None:
                raise ValueError(f"{where}: loss.kind={kind} needs teacher topk_ids and topk_logprobs")
            out.append((sc.topk_ids, sc.topk_logprobs, None))
            continue
        want = _ROLLOUT_SUPPORT[spec.support]
        if r.support_kind != want or r.support_ids is None:
            raise ValueError(f"{where}: loss.kind={kind} needs rollout support_kind={want!r}, got {r.support_kind!r}")
        if sc.support_logprobs is None:
            raise ValueError(f"{where}: loss.kind={kind} needs teacher support_logprobs")
        if spec.needs_behavior_logprobs and r.support_logprobs is None:
            raise ValueError(f"{where}: loss.kind={kind} needs the rollout's behaviour support_logprobs")
        out.append((r.support_ids, sc.support_logprobs, r.support_logprobs if spec.needs_behavior_logprobs else None))
    widths = {ids.shape[1] for ids, _, _ in out}
    if len(widths) > 1:
        raise ValueError(f"samples of one batch carry different K/N: {sorted(widths)}")
    return out


def collate(samples: Sequence[ScoredSample], kind: str, pad_id: int = 0) -> TrainBatch:
    """Pad `samples` into a `TrainBatch` for estimator `kind`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    spec = estimator_spec(kind)
    per_position = _per_position(samples, spec)
    batch = len(samples)
    lengths = [len(s.rollout.prompt_ids) + s.rollout.num_tokens for s in samples]
    longest = max(lengths)
    responses = max(s.rollout.num_tokens for s in samples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.int64)
    attention = torch.zeros((batch, longest), dtype=torch.int64)
    logit_index = torch.zeros((batch, responses), dtype=torch.int64)
    valid = torch.zeros((batch, responses), dtype=torch.bool)
    k = per_position[0][0].shape[1] if per_position else 0
    ids = torch.zeros((batch, responses, k), dtype=torch.int64) if per_position else None
    teacher = torch.zeros((batch, responses, k), dtype=torch.float32) if per_position else None
    behavior = (
        torch.zeros((batch, responses, k), dtype=torch.float32)
        if per_position and spec.needs_behavior_logprobs
        else None
    )
    for i, s in enumerate(samples):
        prompt = torch.as_tensor(np.asarray(s.rollout.prompt_ids, dtype=np.int64))
        response = torch.as_tensor(np.asarray(s.rollout.response_ids, dtype=np.int64))
        p, t = len(prompt), len(response)
        if p == 0:
            raise ValueError(f"sample {s.rollout.sample_id!r} has an empty prompt (no logits score its first token)")
        input_ids[i, :p] = prompt
        input_ids[i, p : p + t] = response
        attention[i, : p + t] = 1
        logit_index[i, :t] = torch.arange(p - 1, p - 1 + t)
        valid[i, :t] = True
        if per_position is not None:
            pid, plp, pbl = per_position[i]
            if pid.shape[0] != t or plp.shape != pid.shape:
                raise ValueError(
                    f"sample {s.rollout.sample_id!r}: per-position data {pid.shape}/{plp.shape} "
                    f"does not match its {t} response tokens"
                )
            assert ids is not None and teacher is not None
            ids[i, :t] = torch.as_tensor(np.asarray(pid, dtype=np.int64))
            teacher[i, :t] = torch.as_tensor(np.asarray(plp, dtype=np.float32))
            if behavior is not None and pbl is not None:
                behavior[i, :t] = torch.as_tensor(np.asarray(pbl, dtype=np.float32))
    return TrainBatch(input_ids, attention, logit_index, valid, ids, teacher, behavior)
