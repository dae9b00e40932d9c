"""Prefill-only teacher scoring of rollouts: per response position, the teacher's log-probs.

For a rollout with prompt x and response y_1..y_T, position t is scored with the teacher's
next-token distribution p(· | x, y_<t), normalized over the FULL vocabulary (log_softmax of the
logits, float32, no temperature): the top-Kt ids and log-probs (forward KL), the log-probs at
the rollout's support ids (student top-K or MC draws, for reverse KL), the log-prob of y_t, and
optionally the tail log-mass log(1 - Σ_topK p) (computed as log Σ over the non-top-K ids).

Rollouts are packed into forward passes of at most `max_batch_tokens` padded tokens (sorted by
length so padding stays small), left-padded so every response ends at the right edge and only
the last T_max + 1 positions' logits are materialized. This module knows torch and the model;
it knows nothing of the cache or gRPC.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from asyncopd.records import Rollout, TeacherScores


class TeacherScorer:
    """Scores rollouts with a frozen causal LM."""

    def __init__(self, model: PreTrainedModel, name: str = "", max_batch_tokens: int = 8192, pad_id: int = 0) -> None:
        self._model = model.eval()
        self._name = name
        self._max_batch_tokens = max_batch_tokens
        self._pad_id = pad_id
        self._device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward at a time (gRPC threads + the cache loop)
        self.vocab_size = int(model.config.vocab_size)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30

    def check(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> None:
        """Reject requests that cannot be scored (ValueError naming the field), before any work."""
        if not 0 <= topk <= self.vocab_size:
            raise ValueError(f"topk: {topk} must be in 0..{self.vocab_size} (the vocabulary size)")
        if tail and topk == 0:
            raise ValueError("tail: the tail log-mass is 1 - Σ top-K; it needs topk >= 1")
        for i, r in enumerate(rollouts):
            n = len(r.prompt_ids) + len(r.response_ids)
            if len(r.prompt_ids) == 0 or len(r.response_ids) == 0:
                raise ValueError(f"rollouts[{i}]: prompt and response must each hold at least one token")
            if n > self.max_len:
                raise ValueError(f"rollouts[{i}]: {n} tokens exceed the teacher's context ({self.max_len})")
            for field, ids in (
                ("prompt_ids", r.prompt_ids),
                ("response_ids", r.response_ids),
                ("support_ids", r.support_ids),
            ):
                if ids is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                    raise ValueError(f"rollouts[{i}].{field}: token ids must be in 0..{self.vocab_size - 1}")

    def score(self, rollouts: Sequence[Rollout], topk: int, tail: bool = False) -> list[TeacherScores]:
        """Scores in the order of `rollouts`."""
        self.check(rollouts, topk, tail)
        out: list[TeacherScores | None] = [None] * len(rollouts)
        for batch in self._batches(rollouts):
            for index, scores in zip(batch, self._score_batch([rollouts[i] for i in batch], topk, tail), strict=True):
                out[index] = scores
        return [s for s in out if s is not None]

    def _batches(self, rollouts: Sequence[Rollout]) -> list[list[int]]:
        """Indices grouped so that rows x longest row <= max_batch_tokens (a lone long row still goes)."""
        order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            n = len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids)
            if current and n * (len(current) + 1) > self._max_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _score_batch(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> list[TeacherScores]:
        seqs = [np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64) for r in rollouts]
        width = max(len(s) for s in seqs)
        keep = max(len(r.response_ids) for r in rollouts) + 1
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long, device=self._device)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.from_numpy(s)
            mask[row, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._lock, torch.no_grad():
            logits = self._model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
        # logits[:, j] predicts the token at column width - keep + j + 1; a response of t tokens
        # occupies the last t columns, so its predictions are logits[row, keep - 1 - t : keep - 1].
        logp = torch.log_softmax(logits[:, : keep - 1].float(), dim=-1)  # [B, keep - 1, V]
        n, span = len(rollouts), keep - 1
        targets = torch.zeros((n, span), dtype=torch.long, device=logp.device)
        for row, r in enumerate(rollouts):
            targets[row, span - len(r.response_ids) :] = torch.from_numpy(np.array(r.response_ids, dtype=np.int64))
        token = logp.gather(-1, targets[..., None]).squeeze(-1).cpu().numpy()
        topk_ids = topk_lps = tail_mass = None
        if topk:
            values, indices = logp.topk(topk, dim=-1)
            topk_lps, topk_ids = values.cpu().numpy(), indices.to(torch.int32).cpu().numpy()
            if tail:
                # log Σ_{v ∉ top-K} p(v) directly, not log(1 - Σ_top-K p): no cancellation when the
                # tail is tiny. An empty tail (K = V) is floored at log(smallest normal), as
                # `opd.numerics.log1mexp` does, so it stays finite.
                rest = logp.scatter(-1, indices, float("-inf"))
                floor = math.log(torch.finfo(torch.float32).tiny)
                tail_mass = torch.logsumexp(rest, dim=-1).clamp(min=floor).cpu().numpy()
        results = []
        for row, r in enumerate(rollouts):
            t = len(r.response_ids)
            cols = slice(span - t, span)
            support = None
            if r.support_ids is not None:
                ids_t = torch.from_numpy(np.array(r.support_ids, dtype=np.int64)).to(logp.device)
                support = logp[row, cols].gather(-1, ids_t).cpu().numpy()
            results.append(
                TeacherScores(
                    sample_id=r.sample_id,
                    token_logprobs=token[row, cols],
                    topk_ids=None if topk_ids is None else topk_ids[row, cols],
                    topk_logprobs=None if topk_lps is None else topk_lps[row, cols],
                    support_logprobs=support,
                    tail_logmass=None if tail_mass is None else tail_mass[row, cols],
                    teacher=self._name,
                )
            )
        return results
