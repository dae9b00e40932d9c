"""The learner's front to the estimators: LossInputs -> OPDLoss -> LossOutputs (loss + metrics).

`OPDLoss` is built from plain arguments (the learner maps its `LossConfig` onto them), picks
one estimator, reduces its per-position values to a token mean over valid positions, and
reports diagnostics as plain floats. It knows nothing about configs, batching, optimisers or
where the tensors came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from asyncopd.opd.corrections import DECOUPLED_MODES, DecoupledMode
from asyncopd.opd.estimators import (
    BASELINES,
    Advantage,
    Baseline,
    Correction,
    forward_kl_full,
    forward_kl_topk,
    reverse_kl_full,
    reverse_kl_mc_terms,
    reverse_kl_topk,
)
from asyncopd.opd.specs import ESTIMATOR_SPECS, Support, estimator_spec
from asyncopd.opd.vocab import Logits

EstimatorKind = Literal["forward_kl_topk", "reverse_kl_topk", "reverse_kl_mc", "forward_kl_full", "reverse_kl_full"]
Tail = Literal["drop", "bucket", "renorm"]

ESTIMATOR_KINDS: tuple[str, ...] = tuple(ESTIMATOR_SPECS)


def token_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of `values` [...] over positions where `valid` (bool [...]) is True -> scalar.

    Invalid positions are selected away (not multiplied by 0), so NaN/inf there cannot leak.
    With no valid position the result is 0 (with a gradient of 0), not NaN.
    """
    if values.shape != valid.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != valid shape {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch of positions. Leading shape [...] is typically [batch, sequence].

    Which fields are needed depends on the kind: `*_topk` and `reverse_kl_mc` need ids and
    teacher_logprobs; `reverse_kl_mc` also behavior_logprobs (and proximal_logprobs for
    correction="decoupled"); `*_full` need teacher_logits.
    """

    student_logits: Logits
    """[..., V] current student logits π_θ, with gradient; any float dtype (computed in fp32). A
    `ProjectedLogits` (hidden states + LM head) gives the same loss and gradients chunk by chunk."""
    valid: Tensor
    """bool [...]: response positions that count; prompt and padding are False."""
    ids: Tensor | None = None
    """int [..., K]: teacher top-K ids, behaviour-student top-K support ids, or N MC sample ids."""
    teacher_logprobs: Tensor | None = None
    """[..., K] teacher log-probs (normalised over the full vocabulary) at `ids`."""
    behavior_logprobs: Tensor | None = None
    """[..., K] log μ(ids) recorded at rollout time (reverse_kl_mc)."""
    proximal_logprobs: Tensor | None = None
    """[..., K] log π_prox(ids), no gradient (reverse_kl_mc with correction="decoupled")."""
    teacher_logits: Logits | None = None
    """[..., V] full teacher logits (forward_kl_full / reverse_kl_full), a tensor or projected."""


@dataclass(frozen=True)
class LossOutputs:
    """What one loss call returns: a scalar to backpropagate and numbers to log."""

    loss: Tensor
    """Scalar: token mean over valid positions of the per-position estimator (with gradient)."""
    per_position: Tensor
    """[...] per-position values (detached; 0 at invalid positions)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """loss, kl (a KL estimate: the estimator value for KL kinds, the IS estimate of KL(π_θ‖p)
    for reverse_kl_mc), valid_tokens; reverse_kl_mc adds ratio_mean/min/max (π_θ/μ over valid
    samples), log_ratio_sq_mean (M2PO's M), clipped_fraction, masked_fraction."""


class OPDLoss:
    """One OPD estimator with its settings; call it on `LossInputs` to get `LossOutputs`."""

    def __init__(
        self,
        kind: EstimatorKind = "reverse_kl_mc",
        *,
        tail: Tail = "bucket",
        advantage: Advantage = "recompute",
        correction: Correction = "is",
        clip_eps: float = 0.2,
        behavior_weight_cap: float = 5.0,
        m2po_tau: float = 0.04,
        decoupled_mode: DecoupledMode = "mask",
        m2po_budget: float = 0.01,
        baseline: Baseline = "none",
    ) -> None:
        if kind not in ESTIMATOR_KINDS:
            raise ValueError(f"kind must be one of {ESTIMATOR_KINDS}, got {kind!r}")
        self.spec = estimator_spec(kind)
        if tail == "renorm" and not self.spec.renorm_tail:
            raise ValueError(
                f"tail='renorm' is only defined for kind='forward_kl_topk' (got kind={kind!r}); use 'drop' or 'bucket'"
            )
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
        if behavior_weight_cap <= 0.0:
            raise ValueError(f"behavior_weight_cap must be > 0, got {behavior_weight_cap}")
        if m2po_tau <= 0.0:
            raise ValueError(f"m2po_tau must be > 0, got {m2po_tau}")
        if m2po_budget <= 0.0:
            raise ValueError(f"m2po_budget must be > 0, got {m2po_budget}")
        if decoupled_mode not in DECOUPLED_MODES:
            raise ValueError(f"decoupled_mode must be one of {DECOUPLED_MODES}, got {decoupled_mode!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if baseline != "none" and self.spec.support is not Support.MC_SAMPLES:
            raise ValueError(f"baseline={baseline!r} applies to the MC estimator (reverse_kl_mc), not {kind!r}")
        self.kind = kind
        self.tail = tail
        self.advantage = advantage
        self.correction = correction
        self.clip_eps = clip_eps
        self.behavior_weight_cap = behavior_weight_cap
        self.m2po_tau = m2po_tau
        self.decoupled_mode = decoupled_mode
        self.m2po_budget = m2po_budget
        self.baseline = baseline

    def __call__(self, inputs: LossInputs) -> LossOutputs:
        valid = inputs.valid.to(torch.bool)
        if valid.shape != inputs.student_logits.shape[:-1]:
            raise ValueError(
                f"valid shape {tuple(valid.shape)} != student_logits leading shape "
                f"{tuple(inputs.student_logits.shape[:-1])}"
            )
        extra: dict[str, Tensor] = {}
        if self.spec.support is Support.MC_SAMPLES:
            per_position, kl, extra = self._mc(inputs, valid)
        else:
            per_position = self._kl(inputs)
            kl = per_position.detach()
        loss = token_mean(per_position, valid)
        shown = torch.where(valid, per_position.detach(), torch.zeros_like(kl))
        scalars = {"loss": loss.detach(), "kl": token_mean(kl, valid), "valid_tokens": valid.sum(), **extra}
        names = list(scalars)
        # one device->host transfer for every metric
        values = torch.stack([scalars[name].to(torch.float64) for name in names]).tolist()
        return LossOutputs(loss=loss, per_position=shown, metrics=dict(zip(names, values, strict=True)))

    def _need(self, inputs: LossInputs, name: str) -> Tensor:
        tensor = getattr(inputs, name)
        if tensor is None:
            raise ValueError(f"kind={self.kind!r} (correction={self.correction!r}) needs LossInputs.{name}")
        return tensor

    def _kl(self, inputs: LossInputs) -> Tensor:
        if self.kind == "forward_kl_full":
            return forward_kl_full(inputs.student_logits, self._need(inputs, "teacher_logits"))
        if self.kind == "reverse_kl_full":
            return reverse_kl_full(inputs.student_logits, self._need(inputs, "teacher_logits"))
        ids = self._need(inputs, "ids")
        teacher = self._need(inputs, "teacher_logprobs")
        if self.kind == "forward_kl_topk":
            return forward_kl_topk(inputs.student_logits, ids, teacher, tail=self.tail)
        if self.tail == "renorm":
            raise ValueError("reverse_kl_topk has no 'renorm' tail")
        return reverse_kl_topk(inputs.student_logits, ids, teacher, tail=self.tail)

    def _mc(self, inputs: LossInputs, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        terms = reverse_kl_mc_terms(
            inputs.student_logits,
            self._need(inputs, "ids"),
            self._need(inputs, "teacher_logprobs"),
            self._need(inputs, "behavior_logprobs"),
            advantage=self.advantage,
            correction=self.correction,
            clip_eps=self.clip_eps,
            proximal_logprobs=(self._need(inputs, "proximal_logprobs") if self.correction == "decoupled" else None),
            behavior_weight_cap=self.behavior_weight_cap,
            m2po_tau=self.m2po_tau,
            mask=valid,
            decoupled_mode=self.decoupled_mode,
            m2po_budget=self.m2po_budget,
            baseline=self.baseline,
        )
        tokens = valid.unsqueeze(-1).expand_as(terms.log_ratio)
        count = tokens.sum().clamp(min=1).to(terms.log_ratio.dtype)
        ratio = terms.log_ratio.exp()
        if bool(tokens.any()):
            ratio_min, ratio_max = ratio[tokens].min(), ratio[tokens].max()
        else:
            ratio_min = ratio_max = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
        extra = {
            "ratio_mean": torch.where(tokens, ratio, 0.0).sum() / count,
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "log_ratio_sq_mean": torch.where(tokens, terms.log_ratio.square(), 0.0).sum() / count,
            "clipped_fraction": (terms.clipped & tokens).sum() / count,
            "masked_fraction": (tokens & ~terms.kept).sum() / count,
        }
        return terms.surrogate.mean(-1), terms.kl_estimate, extra
