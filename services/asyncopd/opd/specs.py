"""What each OPD estimator consumes, declared once next to the estimators.

An `EstimatorSpec` says, for one `kind`, which direction of KL it estimates, where its
per-position ids come from (`support`), and which inputs it needs beyond the student's logits.
The services read these properties (does the learner need a colocated teacher? what must a
rollout record? which top-K does the teacher return?) instead of parsing the kind's name.
`estimator_spec(kind)` looks one up and fails, naming the allowed kinds, on an unknown one.

It knows the estimator functions of this package; it knows nothing of configs, records,
wires or services (mapping `support` onto what a rollout records is the caller's job).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from torch import Tensor

from asyncopd.opd.estimators import forward_kl_full, forward_kl_topk, reverse_kl_full, reverse_kl_mc, reverse_kl_topk

Direction = Literal["forward", "reverse"]


class Support(enum.Enum):
    """Where an estimator's per-position ids (`LossInputs.ids`) come from."""

    TEACHER_TOPK = "teacher_topk"
    """The teacher's top-K ids with its log-probs: the teacher returns K = loss.k per position."""
    STUDENT_TOPK = "student_topk"
    """The behaviour student's top-K ids, recorded by the rollout; the teacher scores them."""
    MC_SAMPLES = "mc_samples"
    """N ids sampled from the behaviour student, with their log μ, recorded by the rollout."""
    DENSE = "dense"
    """No ids: the estimator sums over the whole vocabulary of dense teacher logits."""


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator kind's declared capabilities (what it consumes, not how it computes)."""

    kind: str
    direction: Direction
    """forward = KL(p‖π_θ) (teacher-weighted), reverse = KL(π_θ‖p) (student-weighted)."""
    support: Support
    estimator: Callable[..., Tensor]
    """The per-position function this kind runs (`asyncopd.opd.estimators`)."""
    needs_teacher_logits: bool = False
    """Dense [..., V] teacher logits at the learner: the learner runs a colocated teacher."""
    needs_behavior_logprobs: bool = False
    """log μ(ids) recorded at rollout time travels with each sample."""
    renorm_tail: bool = False
    """tail="renorm" (both distributions renormalised over the K ids) is defined for it."""


ESTIMATOR_SPECS: Mapping[str, EstimatorSpec] = MappingProxyType(
    {
        s.kind: s
        for s in (
            EstimatorSpec("forward_kl_topk", "forward", Support.TEACHER_TOPK, forward_kl_topk, renorm_tail=True),
            EstimatorSpec("reverse_kl_topk", "reverse", Support.STUDENT_TOPK, reverse_kl_topk),
            EstimatorSpec("reverse_kl_mc", "reverse", Support.MC_SAMPLES, reverse_kl_mc, needs_behavior_logprobs=True),
            EstimatorSpec("forward_kl_full", "forward", Support.DENSE, forward_kl_full, needs_teacher_logits=True),
            EstimatorSpec("reverse_kl_full", "reverse", Support.DENSE, reverse_kl_full, needs_teacher_logits=True),
        )
    }
)


def estimator_spec(kind: str) -> EstimatorSpec:
    """The spec of estimator `kind`; ValueError naming the allowed kinds for an unknown one."""
    try:
        return ESTIMATOR_SPECS[kind]
    except KeyError:
        raise ValueError(f"unknown estimator kind {kind!r}; allowed: {sorted(ESTIMATOR_SPECS)}") from None
