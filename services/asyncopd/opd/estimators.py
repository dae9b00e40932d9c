"""Per-position OPD estimators of docs/opd-math.md: dense, teacher top-K, student top-K, MC.

Every function takes student logits [..., V] (with gradient) and tensors of ids and
log-probabilities, and returns one value per position [...]; nothing is reduced over the
leading dimensions (except M2PO's mask, which is global by definition). Masking prompt and
padding positions and the token-mean reduction are separate steps (`asyncopd.opd.loss`).

Numerics: everything is computed in fp32 (fp64 for fp64 inputs); log-probabilities are clamped
at `LOGPROB_FLOOR` so -inf never produces NaN; the student's log-softmax is never
materialised (see `asyncopd.opd.vocab`). Top-K ids must be distinct within a position; MC
sample ids may repeat. Student (and teacher) logits may be given as `ProjectedLogits` (hidden
states and an LM head): every estimator then reads the logits through the chunked kernels of
`asyncopd.opd.vocab` only, and no [..., V] tensor is built. This module knows nothing of
configs, wires or services.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from asyncopd.opd.corrections import (
    DecoupledMode,
    decoupled_surrogate,
    importance_surrogate,
    m2po_clip_bounds,
    m2po_mask,
    ppo_clip_surrogate,
)
from asyncopd.opd.numerics import compute_dtype, floor_logprobs, log1mexp
from asyncopd.opd.vocab import Logits, dense_forward_kl, dense_reverse_kl, gather_logits, gather_logprobs

ForwardTail = Literal["drop", "bucket", "renorm"]
ReverseTail = Literal["drop", "bucket"]
Advantage = Literal["recompute", "rollout"]
Correction = Literal["is", "none", "ppo_clip", "decoupled", "m2po", "m2po_clip"]

_FORWARD_TAILS = ("drop", "bucket", "renorm")
_REVERSE_TAILS = ("drop", "bucket")
_ADVANTAGES = ("recompute", "rollout")
Baseline = Literal["none", "mean"]
BASELINES = ("none", "mean")
_CORRECTIONS = ("is", "none", "ppo_clip", "decoupled", "m2po", "m2po_clip")


def _check_sparse(logits: Logits, ids: Tensor, named: dict[str, Tensor | None]) -> None:
    """Shapes: logits [..., V], ids integer [..., K], every named log-prob tensor [..., K]."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"ids leading shape {tuple(ids.shape[:-1])} != logits leading shape {tuple(logits.shape[:-1])} "
            "(expected logits [..., V] and ids [..., K])"
        )
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != ids.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != ids shape {tuple(ids.shape)}")


def _check_dense(student_logits: Logits, teacher_logits: Logits) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )


def forward_kl_full(student_logits: Logits, teacher_logits: Logits) -> Tensor:
    """Dense KL(p‖π_θ) per position: logits [..., V] (teacher is a constant target) -> [...]."""
    _check_dense(student_logits, teacher_logits)
    return dense_forward_kl(student_logits, teacher_logits)


def reverse_kl_full(student_logits: Logits, teacher_logits: Logits) -> Tensor:
    """Dense KL(π_θ‖p) per position: logits [..., V] (teacher is a constant target) -> [...]."""
    _check_dense(student_logits, teacher_logits)
    return dense_reverse_kl(student_logits, teacher_logits)


def _tail_logmass(logprobs: Tensor) -> Tensor:
    """log(1 − Σ_K exp(logprobs)) per position: [..., K] -> [...] (finite even when Σ ≥ 1)."""
    return log1mexp(torch.logsumexp(logprobs, dim=-1))


def forward_kl_topk(
    student_logits: Logits, teacher_ids: Tensor, teacher_logprobs: Tensor, *, tail: ForwardTail = "drop"
) -> Tensor:
    """Teacher-weighted KL(p‖π_θ) on the teacher's top-K: logits [..., V], ids/logprobs [..., K] -> [...].

    teacher_logprobs are normalised over the full vocabulary. tail = "drop": Σ_K p(log p − log π);
    "bucket": exact KL over K+1 categories, the tail being everything outside the K ids;
    "renorm": KL of both distributions renormalised over the K ids.
    """
    if tail not in _FORWARD_TAILS:
        raise ValueError(f"forward_kl_topk tail must be one of {_FORWARD_TAILS}, got {tail!r}")
    _check_sparse(student_logits, teacher_ids, {"teacher_logprobs": teacher_logprobs})
    cdt = compute_dtype(student_logits.dtype)
    log_p = floor_logprobs(teacher_logprobs, cdt)
    if tail == "renorm":
        # renormalised over K the student's log-partition over V cancels: only K logits matter
        z = gather_logits(student_logits, teacher_ids).to(cdt)
        log_pi_k = floor_logprobs(torch.log_softmax(z, dim=-1), cdt)
        log_p_k = floor_logprobs(log_p - torch.logsumexp(log_p, dim=-1, keepdim=True), cdt)
        return (log_p_k.exp() * (log_p_k - log_pi_k)).sum(-1)
    log_pi = gather_logprobs(student_logits, teacher_ids)
    kl = (log_p.exp() * (log_p - floor_logprobs(log_pi, cdt))).sum(-1)
    if tail == "bucket":
        log_p_tail = _tail_logmass(log_p)
        log_pi_tail = _tail_logmass(log_pi)
        kl = kl + log_p_tail.exp() * (log_p_tail - log_pi_tail)
    return kl


def reverse_kl_topk(
    student_logits: Logits, support_ids: Tensor, teacher_logprobs: Tensor, *, tail: ReverseTail = "drop"
) -> Tensor:
    """Student-weighted KL(π_θ‖p) on the behaviour student's top-K: [..., V], [..., K] -> [...].

    teacher_logprobs are the teacher's full-vocabulary log-probs at `support_ids`.
    tail = "drop": Σ_K π(log π − log p) (biased low); "bucket": with a (K+1)-th tail category.
    """
    if tail not in _REVERSE_TAILS:
        raise ValueError(f"reverse_kl_topk tail must be one of {_REVERSE_TAILS}, got {tail!r}")
    _check_sparse(student_logits, support_ids, {"teacher_logprobs": teacher_logprobs})
    cdt = compute_dtype(student_logits.dtype)
    log_p = floor_logprobs(teacher_logprobs, cdt)
    log_pi_raw = gather_logprobs(student_logits, support_ids)
    log_pi = floor_logprobs(log_pi_raw, cdt)
    kl = (log_pi.exp() * (log_pi - log_p)).sum(-1)
    if tail == "bucket":
        log_pi_tail = _tail_logmass(log_pi_raw)
        log_p_tail = _tail_logmass(log_p)
        kl = kl + log_pi_tail.exp() * (log_pi_tail - log_p_tail)
    return kl


@dataclass(frozen=True)
class MCTerms:
    """Per-sample pieces of the MC reverse-KL estimator; positions [...], N samples each."""

    surrogate: Tensor
    """[..., N] ℓ_j (0 for masked/invalid samples); its gradient is the per-sample estimator."""
    log_ratio: Tensor
    """[..., N] log π_θ(y_j) − log μ(y_j), detached."""
    clipped: Tensor
    """bool [..., N]: PPO's clipped branch is active (zero gradient); all False without clipping."""
    kept: Tensor
    """bool [..., N]: the sample contributes (valid, not M2PO-masked, behaviour weight under cap)."""
    kl_estimate: Tensor
    """[...] importance-weighted estimate of KL(π_θ‖p): mean_j r_j (log π_θ(y_j) − log p(y_j)), detached."""


def reverse_kl_mc_terms(
    student_logits: Logits,
    sample_ids: Tensor,
    teacher_logprobs: Tensor,
    behavior_logprobs: Tensor,
    *,
    advantage: Advantage = "recompute",
    correction: Correction = "is",
    clip_eps: float = 0.2,
    proximal_logprobs: Tensor | None = None,
    behavior_weight_cap: float = 5.0,
    m2po_tau: float = 0.04,
    mask: Tensor | None = None,
    decoupled_mode: DecoupledMode = "mask",
    m2po_budget: float = 0.01,
    baseline: Baseline = "none",
) -> MCTerms:
    """The per-sample terms behind `reverse_kl_mc` (same arguments), for losses that log diagnostics."""
    if advantage not in _ADVANTAGES:
        raise ValueError(f"advantage must be one of {_ADVANTAGES}, got {advantage!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "mean" and sample_ids.shape[-1] < 2:
        raise ValueError("baseline='mean' needs N >= 2 samples per position (it averages the other samples)")
    if correction not in _CORRECTIONS:
        raise ValueError(f"correction must be one of {_CORRECTIONS}, got {correction!r}")
    if correction == "decoupled" and proximal_logprobs is None:
        raise ValueError("correction='decoupled' needs proximal_logprobs (log π_prox at sample_ids)")
    _check_sparse(
        student_logits,
        sample_ids,
        {
            "teacher_logprobs": teacher_logprobs,
            "behavior_logprobs": behavior_logprobs,
            "proximal_logprobs": proximal_logprobs,
        },
    )
    if mask is not None and mask.shape != sample_ids.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != positions shape {tuple(sample_ids.shape[:-1])}")
    cdt = compute_dtype(student_logits.dtype)
    log_pi = floor_logprobs(gather_logprobs(student_logits, sample_ids), cdt)
    log_p = floor_logprobs(teacher_logprobs, cdt)
    log_mu = floor_logprobs(behavior_logprobs, cdt).detach()
    valid = (
        torch.ones_like(log_pi, dtype=torch.bool)
        if mask is None
        else mask.to(torch.bool).unsqueeze(-1).expand_as(log_pi)
    )
    adv = (log_p - log_pi.detach()) if advantage == "recompute" else (log_p - log_mu)
    if baseline == "mean":
        adv = adv - leave_one_out_mean(adv.detach())
    log_ratio = log_pi - log_mu
    clipped = torch.zeros_like(valid)
    kept = valid
    if correction == "is":
        surrogate = importance_surrogate(log_ratio, adv)
    elif correction == "none":
        surrogate = -log_pi * adv.detach()
    elif correction == "ppo_clip":
        surrogate, clipped = ppo_clip_surrogate(log_ratio, adv, clip_eps)
    elif correction == "decoupled":
        assert proximal_logprobs is not None
        log_prox = floor_logprobs(proximal_logprobs, cdt).detach()
        surrogate, clipped, under_cap = decoupled_surrogate(
            log_pi, log_prox, log_mu, adv, clip_eps=clip_eps, cap=behavior_weight_cap, mode=decoupled_mode
        )
        kept = valid & under_cap
    elif correction == "m2po_clip":
        low, high = m2po_clip_bounds(log_ratio, adv, valid, m2po_budget)
        surrogate, clipped = ppo_clip_surrogate(log_ratio, adv, low, high)
    else:
        kept = m2po_mask(log_ratio, valid, m2po_tau)
        surrogate = importance_surrogate(log_ratio, adv)
    surrogate = torch.where(kept, surrogate, torch.zeros_like(surrogate))
    with torch.no_grad():
        kl_estimate = (torch.exp(log_ratio) * (log_pi - log_p)).mean(-1)
    return MCTerms(
        surrogate=surrogate,
        log_ratio=log_ratio.detach(),
        clipped=clipped & valid,
        kept=kept,
        kl_estimate=kl_estimate,
    )


def reverse_kl_mc(
    student_logits: Logits,
    sample_ids: Tensor,
    teacher_logprobs: Tensor,
    behavior_logprobs: Tensor,
    *,
    advantage: Advantage = "recompute",
    correction: Correction = "is",
    clip_eps: float = 0.2,
    proximal_logprobs: Tensor | None = None,
    behavior_weight_cap: float = 5.0,
    m2po_tau: float = 0.04,
    mask: Tensor | None = None,
    decoupled_mode: DecoupledMode = "mask",
    m2po_budget: float = 0.01,
    baseline: Baseline = "none",
) -> Tensor:
    """MC reverse-KL surrogate per position: L(s) = (1/N) Σ_j −w_j A_j; its gradient is the estimator.

    Shapes: student_logits [..., V]; sample_ids, teacher_logprobs (log p(y_j)),
    behavior_logprobs (log μ(y_j), recorded at rollout) and proximal_logprobs (log π_prox(y_j),
    no gradient; `decoupled` only) [..., N]; mask bool [...] (valid positions: invalid ones
    return 0, and M2PO's mask is computed over valid tokens only) -> [...].
    advantage: "recompute" A_j = log p − sg(log π_θ) (unbiased), "rollout" A_j = log p − log μ.
    correction: "is" (w = π_θ/μ), "none" (REINFORCE on log π_θ), "ppo_clip" (ε = clip_eps),
    "decoupled" (PPO clip on π_θ/π_prox times π_prox/μ, zeroed above behavior_weight_cap with
    decoupled_mode="mask", truncated at it with "truncate"), "m2po" (IS with the M2PO mask at
    m2po_tau), "m2po_clip" (the paper code's M2PO: a PPO clip whose bounds come from the second
    moment of the harmful tokens' log-ratios against m2po_budget, floored at 0.3 / 0.5; global over
    the valid tokens passed in). The value is a surrogate, not a KL.
    baseline: "none", or "mean": A_j minus the mean of the position's other N − 1 advantages
    (`leave_one_out_mean`; needs N >= 2), a variance reduction that leaves the expected gradient
    unchanged when the samples are drawn from π_θ (μ = π_θ).
    """
    terms = reverse_kl_mc_terms(
        student_logits,
        sample_ids,
        teacher_logprobs,
        behavior_logprobs,
        advantage=advantage,
        correction=correction,
        clip_eps=clip_eps,
        proximal_logprobs=proximal_logprobs,
        behavior_weight_cap=behavior_weight_cap,
        m2po_tau=m2po_tau,
        mask=mask,
        decoupled_mode=decoupled_mode,
        m2po_budget=m2po_budget,
        baseline=baseline,
    )
    return terms.surrogate.mean(-1)


def leave_one_out_mean(values: Tensor) -> Tensor:
    """[..., N] -> [..., N]: for each j, the mean of the other N − 1 values at the same position
    (the RLOO baseline; N >= 2)."""
    n = values.shape[-1]
    return (values.sum(-1, keepdim=True) - values) / (n - 1)
