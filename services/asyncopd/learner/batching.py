"""Scored samples -> padded training tensors for one estimator kind.

A sample is the sequence prompt + response; the student's logits that score response token t
sit at sequence position P - 1 + t. `collate` right-pads a list of samples into one
`TrainBatch` holding exactly what the configured estimator needs (teacher top-K for forward
KL, the behaviour student's top-K for sparse reverse KL, N MC samples with behaviour log-probs
for MC reverse KL) and fails loudly, naming the sample and field, when a sample lacks it.

Micro-batches: `plan_micro_batches` cuts rows lo:hi into consecutive row ranges, either of at
most `max_rows` rows or, under a token budget, of as many rows as fit it: padded rows cost
rows x longest sequence, packed rows the sum of their lengths. `TrainBatch.pack` concatenates
the rows of a (micro-)batch into one row without padding, with position ids that restart at 0
for every row: Hugging Face models read such position ids, given no attention mask, as packed
sequences and keep attention inside each row (block-diagonal causal mask), so a packed row
gives the same hidden states as the rows apart. A row longer than the budget gets a
micro-batch of its own (a sequence is never split).

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
    position_ids: Tensor | None = None  # int64 [B, L] when rows are packed (restart at 0 per row); else None

    @property
    def size(self) -> int:
        """Rows (samples; one packed row holds several)."""
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def lengths(self) -> list[int]:
        """Sequence length (prompt + response) of every row."""
        return [int(n) for n in self.attention_mask.sum(1).tolist()]

    def pack(self) -> TrainBatch:
        """All rows as one row [1, Σ lengths], no padding: position-wise tensors keep their
        valid positions in row order (what `pack_positions` does to any aligned tensor)."""
        if self.packed:
            raise ValueError("batch is already packed")
        present = self.attention_mask.to(torch.bool)
        lengths = present.sum(1)
        starts = torch.cumsum(lengths, 0) - lengths  # where each row begins in the packed row
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(present)
        row_of_token = torch.arange(self.size, device=self.valid.device).unsqueeze(1).expand_as(self.valid)
        logit_index = self.logit_index[self.valid] + starts[row_of_token[self.valid]]
        return TrainBatch(
            input_ids=self.input_ids[present].unsqueeze(0),
            attention_mask=torch.ones((1, int(lengths.sum())), dtype=self.attention_mask.dtype, device=present.device),
            logit_index=logit_index.unsqueeze(0),
            valid=torch.ones_like(logit_index, dtype=torch.bool).unsqueeze(0),
            ids=pack_positions(self.ids, self.valid),
            teacher_logprobs=pack_positions(self.teacher_logprobs, self.valid),
            behavior_logprobs=pack_positions(self.behavior_logprobs, self.valid),
            position_ids=positions[present].unsqueeze(0),
        )

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
            position_ids=move(self.position_ids),
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
            position_ids=cut(self.position_ids),
        )


def pack_positions(tensor: Tensor | None, valid: Tensor) -> Tensor | None:
    """A position-wise tensor [B, T, ...] in the packed layout [1, Σ valid, ...] (None stays None)."""
    return None if tensor is None else tensor[valid].unsqueeze(0)


def unpack_positions(packed: Tensor, valid: Tensor) -> Tensor:
    """The inverse of `pack_positions`: [1, Σ valid, ...] -> [B, T, ...], zeros where not valid."""
    out = packed.new_zeros((*valid.shape, *packed.shape[2:]))
    out[valid] = packed[0]
    return out


def plan_micro_batches(
    lengths: Sequence[int], lo: int, hi: int, *, max_rows: int, max_tokens: int = 0, packed: bool = False
) -> list[tuple[int, int]]:
    """Rows lo:hi as consecutive (start, stop) ranges, one per micro-batch.

    Without a budget (`max_tokens` = 0) each range has `max_rows` rows (the last fewer). With
    one, `max_rows` does not apply and rows are added while the micro-batch still fits it:
    padded, (rows x longest length) <= max_tokens; packed, Σ lengths <= max_tokens. A row over
    the budget is alone.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if not max_tokens:
        return [(start, min(start + max_rows, hi)) for start in range(lo, hi, max_rows)]
    ranges: list[tuple[int, int]] = []
    start, longest, total = lo, 0, 0
    for row in range(lo, hi):
        n = lengths[row]
        cost = total + n if packed else (row - start + 1) * max(longest, n)
        if row > start and cost > max_tokens:
            ranges.append((start, row))
            start, longest, total = row, 0, 0
        longest, total = max(longest, n), total + n
    if hi > lo:
        ranges.append((start, hi))
    return ranges


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


def collate(
    samples: Sequence[ScoredSample], kind: str, pad_id: int = 0, oldest_usable: int | None = None
) -> TrainBatch:
    """Pad `samples` into a `TrainBatch` for estimator `kind`. With `oldest_usable`
    (`StalenessPolicy.oldest_usable` at the training version; stale_tokens: mask) a response
    token generated by older weights is not `valid`: it is scored by nothing and trained on by
    nothing (its position still conditions the tokens after it)."""
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
        if oldest_usable is None:
            valid[i, :t] = True
        else:
            valid[i, :t] = torch.as_tensor(np.asarray(s.rollout.versions) >= oldest_usable)
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
