"""Off-policy corrections for Monte-Carlo OPD: importance weights, PPO clip, decoupled PPO, M2PO.

Each function maps per-sample log-probabilities and advantages to a per-sample surrogate
(whose gradient is the correction's estimator) or to a mask. They know the formulas of
docs/opd-math.md ("Monte-Carlo reverse KL", "M2PO masking"); they know nothing about
vocabularies, logits, teachers or how advantages were computed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def importance_surrogate(log_ratio: Tensor, advantage: Tensor) -> Tensor:
    """ℓ = −r·A with r = exp(log_ratio) (gradient flows through `log_ratio`), A detached."""
    return -torch.exp(log_ratio) * advantage.detach()


def ppo_clipped(ratio: Tensor, advantage: Tensor, clip_eps: float) -> Tensor:
    """True where PPO's clipped branch is active, i.e. where the sample gets zero gradient.

    max(−rA, −clip(r, 1−ε, 1+ε)A) takes the clipped (constant) branch exactly when
    A > 0 and r > 1+ε, or A < 0 and r < 1−ε. ratio, advantage [...] -> bool [...].
    """
    ratio = ratio.detach()
    advantage = advantage.detach()
    return ((advantage > 0) & (ratio > 1.0 + clip_eps)) | ((advantage < 0) & (ratio < 1.0 - clip_eps))


def ppo_clip_surrogate(log_ratio: Tensor, advantage: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """ℓ = max(−rA, −clip(r, 1−ε, 1+ε)A), r = exp(log_ratio); returns (ℓ, clipped mask).

    Written as a select on the clipped mask rather than `torch.maximum`, so that the clipped
    samples' gradient is exactly zero and unclipped ones get the full −A∇r (maximum splits the
    gradient on ties, which occur for every r inside the clip range).
    """
    advantage = advantage.detach()
    ratio = torch.exp(log_ratio)
    clipped = ppo_clipped(ratio, advantage, clip_eps)
    clipped_value = -ratio.detach().clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage
    return torch.where(clipped, clipped_value, -ratio * advantage), clipped


def behavior_weight(proximal_logprobs: Tensor, behavior_logprobs: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Decoupled PPO's b = π_prox/μ, set to 0 where it exceeds `cap`; returns (b, kept mask).

    Both inputs are treated as constants (no gradient): b reweights, it is not optimised.
    """
    weight = torch.exp(proximal_logprobs.detach() - behavior_logprobs.detach())
    kept = weight <= cap
    return torch.where(kept, weight, torch.zeros_like(weight)), kept


def decoupled_surrogate(
    log_prob: Tensor,
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantage: Tensor,
    *,
    clip_eps: float,
    cap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """AReaL's decoupled PPO: ℓ = b · max(−rA, −clip(r)A), r = π_θ/π_prox, b = π_prox/μ (capped).

    Returns (ℓ, clipped mask, behaviour-weight kept mask), all [...]. Samples whose b exceeds
    the cap contribute exactly 0 (value and gradient).
    """
    ppo, clipped = ppo_clip_surrogate(log_prob - proximal_logprobs.detach(), advantage, clip_eps)
    weight, kept = behavior_weight(proximal_logprobs, behavior_logprobs, cap)
    return torch.where(kept, weight * ppo, torch.zeros_like(ppo)), clipped, kept


def m2po_mask(log_ratio: Tensor, mask: Tensor | None = None, tau: float = 0.04) -> Tensor:
    """M2PO token mask (True = kept): log_ratio [...], mask bool [...] or None -> bool [...].

    Over the valid tokens (all of `log_ratio` where `mask` is None), M_i = log_ratio_i²
    (no gradient). The fewest tokens with the largest M are masked so that the mean of M over
    the kept tokens is strictly below `tau`; if it already is, nothing is masked. At least one
    token (the smallest M) is always kept. Invalid tokens come back False. The mask is global
    over everything passed in: call it once per optimizer step's batch, not per row. Among
    tokens with equal M, the later ones in flattened order are masked first.
    """
    if tau <= 0:
        raise ValueError(f"m2po tau must be > 0, got {tau}")
    if mask is None:
        valid = torch.ones_like(log_ratio, dtype=torch.bool)
    else:
        if mask.shape != log_ratio.shape:
            raise ValueError(f"m2po mask shape {tuple(mask.shape)} != log_ratio shape {tuple(log_ratio.shape)}")
        valid = mask.to(torch.bool)
    # fp64 so that the prefix means of many small M's are exact enough to compare with tau
    values = log_ratio.detach()[valid].to(torch.float64).square()
    count = values.numel()
    kept = torch.zeros_like(valid)
    if count == 0:
        return kept
    sorted_values, order = torch.sort(values, stable=True)
    prefix_mean = sorted_values.cumsum(0) / torch.arange(1, count + 1, dtype=torch.float64, device=values.device)
    # sorted ascending, so the prefix mean only grows: keep the longest prefix below tau
    too_big = prefix_mean >= tau
    n_keep = int(torch.argmax(too_big.to(torch.int8))) if bool(too_big.any()) else count
    n_keep = max(n_keep, 1)
    kept_flat = torch.zeros(count, dtype=torch.bool, device=values.device)
    kept_flat[order[:n_keep]] = True
    kept[valid] = kept_flat
    return kept
