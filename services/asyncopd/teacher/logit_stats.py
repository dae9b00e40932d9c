"""What a teacher returns for one block of positions, from that block's logits: the log-probs at
given ids (the response token and the rollout's support), the top-K ids and log-probs, and the
tail log-mass. Both backends call it on one chunk of [positions, V] logits at a time (the torch
scorer after its own lm_head, the vLLM backend inside the engine's model runner), so they give
the same answers by construction.

Normalisation is over the FULL vocabulary, float32, no temperature. The tail is computed as
log Σ over the non-top-K ids directly, not log(1 - Σ top-K p): no cancellation when the tail is
tiny; an empty tail (K = V) is floored at log(smallest normal float32), as
`opd.numerics.log1mexp` does, so it stays finite.

It knows torch and `opd.vocab`; it knows nothing of models, engines or rollouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from asyncopd.opd.vocab import gather_logprobs

TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@dataclass
class ChunkStats:
    """Per position of one chunk (all on the logits' device)."""

    gathered: torch.Tensor  # [n, G] float32: log p at the requested ids
    topk_ids: torch.Tensor | None  # [n, K] int64
    topk_logprobs: torch.Tensor | None  # [n, K] float32
    tail_logmass: torch.Tensor | None  # [n] float32


def chunk_stats(logits: torch.Tensor, gather_ids: torch.Tensor, topk: int, tail: bool) -> ChunkStats:
    """Statistics of a [n, V] block of logits (overwritten when `tail`: it is a scratch buffer)."""
    logits = logits.float()
    gathered = gather_logprobs(logits, gather_ids, chunk_elements=logits.numel())
    if not topk:
        return ChunkStats(gathered, None, None, None)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, indices = logits.topk(topk, dim=-1)
    tail_mass = None
    if tail:
        rest = logits.scatter_(-1, indices, float("-inf"))
        tail_mass = (torch.logsumexp(rest, dim=-1) - lse[:, 0]).clamp(min=TAIL_FLOOR)
    return ChunkStats(gathered, indices, values - lse, tail_mass)
