"""Prefill-only teacher scoring of rollouts: per response position, the teacher's log-probs.

For a rollout with prompt x and response y_1..y_T, position t is scored with the teacher's
next-token distribution p(· | x, y_<t), normalized over the FULL vocabulary (log_softmax of the
logits, float32, no temperature): the top-Kt ids and log-probs (forward KL), the log-probs at
the rollout's support ids (student top-K or MC draws, for reverse KL), the log-prob of y_t, and
optionally the tail log-mass log(1 - Σ_topK p) (computed as log Σ over the non-top-K ids).

Rollouts are packed into forward passes of at most `max_batch_tokens` padded tokens (sorted by
length so padding stays small), left-padded. A rollout longer than `max_batch_tokens` is
prefilled alone in segments of that many tokens with a KV cache, so no forward pass holds more.

Memory: the forward pass returns hidden states, never logits. The response positions' hidden
states are gathered (no padding) and projected to the vocabulary a chunk of positions at a time
(`opd.vocab`'s chunk sizes: ~2 MB blocks on CPU, 64 MB on an accelerator); each chunk's
log-normalizer, top-K, tail and gathers are taken before the next chunk is computed. Peak
extra memory is one chunk of [positions, V] fp32 and its temporaries, not the [B, T, V]
log-softmax plus its scattered copy (≈ 22 GB for one 18k-token row at V = 151,936). This
needs logits = lm_head(hidden) (Qwen, Llama, Mistral...); models that scale or soft-cap their
logits are refused. This module knows torch and the model; it knows nothing of the cache or
gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from asyncopd.opd.numerics import rows_per_chunk
from asyncopd.opd.vocab import default_chunk_elements
from asyncopd.records import Rollout, TeacherScores
from asyncopd.teacher.logit_stats import chunk_stats


class Scorer(Protocol):
    """What a teacher replica needs of a scoring backend (this module's torch scorer, or
    `teacher.vllm_scorer`'s)."""

    vocab_size: int
    max_len: int  # prompt + response tokens one rollout may hold

    def score(self, rollouts: Sequence[Rollout], topk: int, tail: bool = False) -> list[TeacherScores]: ...


def check_score_request(rollouts: Sequence[Rollout], topk: int, tail: bool, vocab_size: int, max_len: int) -> None:
    """Reject requests that no backend can score (ValueError naming the field), before any work."""
    if not 0 <= topk <= vocab_size:
        raise ValueError(f"topk: {topk} must be in 0..{vocab_size} (the vocabulary size)")
    if tail and topk == 0:
        raise ValueError("tail: the tail log-mass is 1 - Σ top-K; it needs topk >= 1")
    for i, r in enumerate(rollouts):
        n = len(r.prompt_ids) + len(r.response_ids)
        if len(r.prompt_ids) == 0 or len(r.response_ids) == 0:
            raise ValueError(f"rollouts[{i}]: prompt and response must each hold at least one token")
        if n > max_len:
            raise ValueError(f"rollouts[{i}]: {n} tokens exceed the teacher's context ({max_len})")
        if r.support_ids is not None and (r.support_ids.ndim != 2 or r.support_ids.shape[0] != len(r.response_ids)):
            raise ValueError(f"rollouts[{i}].support_ids: must be [response tokens, k], got {r.support_ids.shape}")
        for field, ids in (
            ("prompt_ids", r.prompt_ids),
            ("response_ids", r.response_ids),
            ("support_ids", r.support_ids),
        ):
            if ids is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"rollouts[{i}].{field}: token ids must be in 0..{vocab_size - 1}")


class TeacherScorer:
    """Scores rollouts with a frozen causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        name: str = "",
        max_batch_tokens: int = 8192,
        pad_id: int = 0,
        *,
        chunk_elements: int | None = None,
    ) -> None:
        self._model = model.eval()
        self._name = name
        self._max_batch_tokens = max_batch_tokens
        self._pad_id = pad_id
        self._device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward at a time (gRPC threads + the cache loop)
        config = model.config
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"teacher model: {attr} is set; the chunked scorer needs logits = lm_head(hidden)")
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        if self._head is None:
            raise ValueError("teacher model: no output embeddings (lm_head) to score with")
        self.vocab_size = int(config.vocab_size)
        self.max_len = int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 30
        self._rows = rows_per_chunk(self.vocab_size, chunk_elements or default_chunk_elements(next(model.parameters())))

    def check(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> None:
        """Reject requests that cannot be scored (ValueError naming the field), before any work."""
        check_score_request(rollouts, topk, tail, self.vocab_size, self.max_len)

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

    def _hidden(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """Final hidden states at every response position (predicting y_1..y_T), rollouts
        concatenated: [Σ T, H]."""
        if len(rollouts) == 1 and len(rollouts[0].prompt_ids) + len(rollouts[0].response_ids) > self._max_batch_tokens:
            return self._hidden_segmented(rollouts[0])
        seqs = [np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64) for r in rollouts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long, device=self._device)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.from_numpy(s)
            mask[row, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._lock, torch.no_grad():
            hidden = self._decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        # Column c predicts the token at c + 1; a response of t tokens occupies the last t
        # columns, so its predictions are columns width - 1 - t .. width - 2.
        return torch.cat([hidden[row, width - 1 - len(r.response_ids) : width - 1] for row, r in enumerate(rollouts)])

    def _hidden_segmented(self, rollout: Rollout) -> torch.Tensor:
        """`_hidden` for one rollout longer than max_batch_tokens: prefill in segments with a KV cache."""
        from transformers import DynamicCache

        seq = torch.from_numpy(np.concatenate([rollout.prompt_ids, rollout.response_ids]).astype(np.int64))
        seq = seq.to(self._device)[None]
        n, first = seq.shape[1], len(rollout.prompt_ids) - 1  # first position that predicts a response token
        cache: Any = DynamicCache()
        parts = []
        with self._lock, torch.no_grad():
            for start in range(0, n - 1, self._max_batch_tokens):
                stop = min(start + self._max_batch_tokens, n - 1)  # the last token predicts nothing
                out = self._decoder(
                    input_ids=seq[:, start:stop],
                    attention_mask=torch.ones((1, stop), dtype=torch.long, device=self._device),
                    position_ids=torch.arange(start, stop, device=self._device)[None],
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                if stop > first:
                    parts.append(out.last_hidden_state[0, max(first, start) - start :])
        return torch.cat(parts)

    def _score_batch(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> list[TeacherScores]:
        hidden = self._hidden(rollouts)  # [P, H]
        lengths = [len(r.response_ids) for r in rollouts]
        total = sum(lengths)
        targets = torch.from_numpy(np.concatenate([r.response_ids for r in rollouts]).astype(np.int64))
        width = max((r.support_ids.shape[1] for r in rollouts if r.support_ids is not None), default=0)
        support_ids = torch.zeros((total, width), dtype=torch.long)
        offsets = np.cumsum([0, *lengths])
        for row, r in enumerate(rollouts):
            if r.support_ids is not None:
                support_ids[offsets[row] : offsets[row + 1], : r.support_ids.shape[1]] = torch.from_numpy(
                    r.support_ids.astype(np.int64)
                )
        # Gathered together: the response token in column 0, then the support ids.
        gather_ids = torch.cat([targets[:, None], support_ids], dim=-1).to(self._device)
        gathered = torch.empty(gather_ids.shape, dtype=torch.float32)
        topk_ids = torch.empty((total, topk), dtype=torch.int32)
        topk_lps = torch.empty((total, topk), dtype=torch.float32)
        tail_mass = torch.empty((total,), dtype=torch.float32)
        with self._lock, torch.no_grad():
            for start in range(0, total, self._rows):
                stop = min(start + self._rows, total)
                stats = chunk_stats(self._head(hidden[start:stop]), gather_ids[start:stop], topk, tail)
                gathered[start:stop] = stats.gathered.cpu()
                if stats.topk_ids is not None and stats.topk_logprobs is not None:
                    topk_ids[start:stop] = stats.topk_ids.int().cpu()
                    topk_lps[start:stop] = stats.topk_logprobs.cpu()
                if stats.tail_logmass is not None:
                    tail_mass[start:stop] = stats.tail_logmass.cpu()
        token, support_lps = gathered[:, 0].numpy(), gathered[:, 1:].numpy()
        results = []
        for row, r in enumerate(rollouts):
            cols = slice(int(offsets[row]), int(offsets[row + 1]))
            support = None
            if r.support_ids is not None:
                support = support_lps[cols, : r.support_ids.shape[1]]
            results.append(
                TeacherScores(
                    sample_id=r.sample_id,
                    token_logprobs=token[cols],
                    topk_ids=topk_ids[cols].numpy() if topk else None,
                    topk_logprobs=topk_lps[cols].numpy() if topk else None,
                    support_logprobs=support,
                    tail_logmass=tail_mass[cols].numpy() if topk and tail else None,
                    teacher=self._name,
                )
            )
        return results
