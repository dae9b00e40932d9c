"""Off-policy corrections for Monte-Carlo OPD: importance weights, PPO clip, decoupled PPO, M2PO.

Each function maps per-sample log-probabilities and advantages to a per-sample surrogate
(whose gradient is the correction's estimator) or to a mask. They know the formulas of
docs/opd-math.md ("Monte-Carlo reverse KL", "M2PO masking", "M2PO dynamic clip", "Decoupled PPO
in the paper's code"); they know nothing about vocabularies, logits, teachers or how advantages
were computed.

Two rules share the name M2PO: `m2po_mask` is the masking rule of the M2PO paper as AReaL
implements it (`correction="m2po"`); `m2po_clip_bounds` is the dynamic PPO clip of the OPD
paper's own code (`correction="m2po_clip"`). Decoupled PPO's behaviour weight is masked above
its cap (AReaL, the paper's code) or, as a labelled variant, truncated at it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def importance_surrogate(log_ratio: Tensor, advantage: Tensor) -> Tensor:
    """ℓ = −r·A with r = exp(log_ratio) (gradient flows through `log_ratio`), A detached."""
    return -torch.exp(log_ratio) * advantage.detach()


def ppo_clipped(ratio: Tensor, advantage: Tensor, clip_eps: float, clip_eps_high: float | None = None) -> Tensor:
    """True where PPO's clipped branch is active, i.e. where the sample gets zero gradient.

    max(−rA, −clip(r, 1−ε, 1+ε_high)A) takes the clipped (constant) branch exactly when
    A > 0 and r > 1+ε_high, or A < 0 and r < 1−ε (ε_high = ε unless given).
    ratio, advantage [...] -> bool [...].
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = ratio.detach()
    advantage = advantage.detach()
    return ((advantage > 0) & (ratio > 1.0 + high)) | ((advantage < 0) & (ratio < 1.0 - clip_eps))


def ppo_clip_surrogate(
    log_ratio: Tensor, advantage: Tensor, clip_eps: float, clip_eps_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """ℓ = max(−rA, −clip(r, 1−ε, 1+ε_high)A), r = exp(log_ratio); returns (ℓ, clipped mask).

    ε_high = ε unless given (an asymmetric clip, as `m2po_clip` sets it). Written as a select on
    the clipped mask rather than `torch.maximum`, so that the clipped samples' gradient is
    exactly zero and unclipped ones get the full −A∇r (maximum splits the gradient on ties,
    which occur for every r inside the clip range).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantage = advantage.detach()
    ratio = torch.exp(log_ratio)
    clipped = ppo_clipped(ratio, advantage, clip_eps, high)
    clipped_value = -ratio.detach().clamp(1.0 - clip_eps, 1.0 + high) * advantage
    return torch.where(clipped, clipped_value, -ratio * advantage), clipped


DecoupledMode = Literal["mask", "truncate"]
DECOUPLED_MODES: tuple[str, ...] = ("mask", "truncate")


def behavior_weight(
    proximal_logprobs: Tensor, behavior_logprobs: Tensor, cap: float, mode: DecoupledMode = "mask"
) -> tuple[Tensor, Tensor]:
    """Decoupled PPO's b = π_prox/μ above `cap`: 0 (mode "mask") or `cap` ("truncate"); returns (b, kept mask).

    "mask" is AReaL's and the paper code's rule; "truncate" keeps every sample with b ≤ cap
    (kept is then all True). Both inputs are constants (no gradient): b reweights, it is not
    optimised.
    """
    if mode not in DECOUPLED_MODES:
        raise ValueError(f"decoupled mode must be one of {DECOUPLED_MODES}, got {mode!r}")
    weight = torch.exp(proximal_logprobs.detach() - behavior_logprobs.detach())
    if mode == "truncate":
        return weight.clamp(max=cap), torch.ones_like(weight, dtype=torch.bool)
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
    mode: DecoupledMode = "mask",
) -> tuple[Tensor, Tensor, Tensor]:
    """AReaL's decoupled PPO: ℓ = b · max(−rA, −clip(r)A), r = π_θ/π_prox, b = π_prox/μ (capped).

    Returns (ℓ, clipped mask, behaviour-weight kept mask), all [...]. With mode "mask" samples
    whose b exceeds the cap contribute exactly 0 (value and gradient); with "truncate" their b
    is the cap.
    """
    ppo, clipped = ppo_clip_surrogate(log_prob - proximal_logprobs.detach(), advantage, clip_eps)
    weight, kept = behavior_weight(proximal_logprobs, behavior_logprobs, cap, mode)
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


M2PO_CLIP_FLOOR_LOW = 0.3
"""The paper code's floor on m2po_clip's lower bound: r is never clipped above 1 − 0.3 from below."""
M2PO_CLIP_FLOOR_HIGH = 0.5
"""The paper code's floor on m2po_clip's upper bound: r is never clipped below 1 + 0.5 from above."""
M2PO_CLIP_OPEN_HIGH = 1e5
"""The upper bound when the harmful tokens are within budget: no upper clip in effect."""


def m2po_clip_bounds(
    log_ratio: Tensor,
    advantage: Tensor,
    mask: Tensor | None = None,
    budget: float = 0.01,
    *,
    floor_low: float = M2PO_CLIP_FLOOR_LOW,
    floor_high: float = M2PO_CLIP_FLOOR_HIGH,
) -> tuple[float, float]:
    """The paper code's M2PO dynamic clip: (ε_low, ε_high) for a PPO clip to [1 − ε_low, 1 + ε_high].

    log_ratio = log π_θ − log μ, advantage and mask (valid tokens; None = all) [...], no gradient.
    With δ = −log_ratio, the harmful tokens are the valid ones a PPO clip would act on
    ((A > 0, r > 1) or (A < 0, r < 1)); n their count, M2 = Σ δ² / n. If n = 0 or M2 ≤ budget
    the bounds are (0, 1e5); otherwise τ solves Σ min(δ², τ²) = budget · n and the bounds are
    (1 − e^−τ, e^τ − 1). Both are then floored at (floor_low, floor_high). Global over
    everything passed in (one call per optimizer step's batch), like M2PO's mask.
    """
    if budget <= 0:
        raise ValueError(f"m2po_clip budget must be > 0, got {budget}")
    valid = torch.ones_like(log_ratio, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if valid.shape != log_ratio.shape or advantage.shape != log_ratio.shape:
        raise ValueError(
            f"m2po_clip shapes differ: log_ratio {tuple(log_ratio.shape)}, advantage {tuple(advantage.shape)}, "
            f"mask {tuple(valid.shape)}"
        )
    lr = log_ratio.detach()
    adv = advantage.detach()
    harmful = valid & (((adv > 0) & (lr > 0)) | ((adv < 0) & (lr < 0)))
    # fp64: the budget is compared with means of many small squares
    squares, _ = torch.sort(lr[harmful].to(torch.float64).square())
    n = squares.numel()
    low, high = 0.0, M2PO_CLIP_OPEN_HIGH
    if n > 0 and float(squares.mean()) > budget:
        target = budget * n
        # water-filling, sorted ascending: with the k smallest kept as they are and the other
        # n − k capped at τ², τ² = (target − Σ_{i<k} δ_i²) / (n − k); the right k has
        # δ_{k−1}² ≤ τ² ≤ δ_k². Over budget means k = n is never reached.
        below = torch.cat([squares.new_zeros(1), squares.cumsum(0)[:-1]])
        remaining = torch.arange(n, 0, -1, dtype=torch.float64, device=squares.device)
        tau_sq = (target - below) / remaining
        fits = tau_sq <= squares
        k = int(torch.argmax(fits.to(torch.int8)))
        tau = math.sqrt(max(float(tau_sq[k]), 0.0))
        low, high = 1.0 - math.exp(-tau), math.exp(tau) - 1.0
    return max(low, floor_low), max(high, floor_high)
