"""The behaviour distribution μ a rollout samples from, and the per-position support drawn from it.

μ is the *actual* sampling distribution, the one importance weights need, not the raw model
softmax: the logits are divided by the temperature, softmaxed, restricted to the top-p nucleus
(the smallest set of most likely tokens whose mass reaches top_p, always at least one token)
and renormalized. Tokens outside the nucleus have log μ = -inf. Greedy decoding is the point
mass on the argmax (log μ = 0 there, -inf elsewhere). With temperature = 1 and top_p = 1, μ is
exactly the model's softmax.

The nucleus rule is vLLM's (sort ascending, drop the tokens whose cumulative mass from the
bottom is <= 1 - top_p), so both engines sample from the same μ.

Pure torch; this module knows nothing of models, tokenizers, engines or the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncopd.records import SupportKind


@dataclass(frozen=True)
class Sampling:
    """How one generation call samples (the engine-neutral form of the wire's SamplingParams)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    greedy: bool = False
    seed: int = 0  # 0 = unseeded

    def __post_init__(self) -> None:
        if not self.greedy and not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"sampling.temperature: {self.temperature} must be in (0, 100] (or set greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p: {self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens: {self.max_tokens} must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop: stop strings must not be empty")


def behaviour_logprobs(logits: Tensor, sampling: Sampling) -> Tensor:
    """log μ over the vocabulary for each row: [B, V] logits -> [B, V] float32 log-probs."""
    logits = logits.float()
    if sampling.greedy:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=False)
    mass_from_bottom = sorted_logp.exp().cumsum(dim=-1)
    drop_sorted = mass_from_bottom <= 1.0 - sampling.top_p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


def sample(logmu: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from μ: [B, V] log μ -> [B] int64 ids."""
    return torch.multinomial(logmu.exp(), 1, generator=generator).squeeze(-1)


def draw_support(
    logmu: Tensor,
    tokens: Tensor,
    kind: SupportKind,
    k: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The per-position support and its log μ, or None for SupportKind.NONE.

    STUDENT_TOPK: the k most likely ids under μ (descending; ids outside the nucleus carry
    -inf). MC_SAMPLES: column 0 is the generated token, columns 1..k-1 are i.i.d. draws from μ
    (with replacement, so k may exceed the vocabulary). Returns ([B, k] int64 ids, [B, k] float32 log μ).
    """
    if kind == SupportKind.NONE:
        return None
    vocab = logmu.shape[-1]
    if kind == SupportKind.STUDENT_TOPK and not 1 <= k <= vocab:
        raise ValueError(f"support_k: {k} must be in 1..{vocab} (the vocabulary size)")
    if k < 1:
        raise ValueError(f"support_k: {k} must be >= 1")
    if kind == SupportKind.STUDENT_TOPK:
        values, ids = logmu.topk(k, dim=-1)
        return ids, values
    if kind == SupportKind.MC_SAMPLES:
        ids = tokens.reshape(-1, 1).long()
        if k > 1:
            draws = torch.multinomial(logmu.exp(), k - 1, replacement=True, generator=generator)
            ids = torch.cat([ids, draws], dim=-1)
        return ids, logmu.gather(-1, ids)
    raise ValueError(f"support_kind: unknown kind {kind!r}")
