"""The OPD estimator a run trains with: one `kind` field chooses it (see docs/opd-math.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncopd.config.base import Section

EstimatorKind = Literal["forward_kl_topk", "reverse_kl_topk", "reverse_kl_mc", "forward_kl_full", "reverse_kl_full"]


class LossConfig(Section):
    """Estimator and its knobs. K (top-k) or N (MC samples) also sets what rollouts/teachers record."""

    kind: EstimatorKind = Field("reverse_kl_mc", description="Which OPD estimator the learner uses.")
    k: int = Field(
        8,
        ge=1,
        le=4096,
        description="K: top-k ids per position (topk kinds) or N MC samples (reverse_kl_mc).",
    )
    tail: Literal["drop", "bucket", "renorm"] = Field(
        "bucket", description="Tail handling for top-k kinds (renorm only for forward_kl_topk)."
    )
    advantage: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="reverse_kl_mc: recompute log π at the learner (OPD fix) or use rollout-time μ.",
    )
    correction: Literal["is", "none", "ppo_clip", "decoupled", "m2po", "m2po_clip"] = Field(
        "is",
        description=(
            "reverse_kl_mc: importance correction / RL stabilizer. m2po = the M2PO paper's masking rule (AReaL); "
            "m2po_clip = the OPD paper code's M2PO, a PPO clip with per-step bounds (docs/opd-math.md)."
        ),
    )
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip ε (ppo_clip, decoupled).")
    behavior_weight_cap: float = Field(5.0, gt=0.0, description="Decoupled PPO: cap on π_prox/μ.")
    decoupled_mode: Literal["mask", "truncate"] = Field(
        "mask",
        description="Decoupled PPO: π_prox/μ above the cap is zeroed (mask: AReaL, the paper code) or set to the cap.",
    )
    m2po_tau: float = Field(0.04, gt=0.0, description="M2PO (m2po): bound on the kept mean squared log-ratio.")
    m2po_budget: float = Field(
        0.01,
        gt=0.0,
        description="M2PO dynamic clip (m2po_clip): second-moment budget of the harmful tokens' log-ratios.",
    )

    baseline: Literal["none", "mean"] = Field(
        "none",
        description="reverse_kl_mc: subtract from each sample's advantage the mean of the other samples' at the same "
        "position (mean: a leave-one-out baseline, variance reduction, unbiased when μ = π_θ; needs k >= 2).",
    )

    @model_validator(mode="after")
    def _baseline_fits_kind(self) -> LossConfig:
        if self.baseline != "none" and (self.kind != "reverse_kl_mc" or self.k < 2):
            raise ValueError(
                f"baseline={self.baseline!r} needs kind='reverse_kl_mc' with k >= 2 samples per position "
                f"(got kind={self.kind!r}, k={self.k})"
            )
        return self

    @model_validator(mode="after")
    def _tail_fits_kind(self) -> LossConfig:
        if self.tail == "renorm" and self.kind != "forward_kl_topk":
            raise ValueError(
                f"tail='renorm' is only defined for kind='forward_kl_topk' (got kind={self.kind!r}); "
                "use 'drop' or 'bucket'"
            )
        return self
