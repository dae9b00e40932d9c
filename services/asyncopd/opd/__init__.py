"""OPD estimators: pure torch math of docs/opd-math.md, imported by the learner and benchmarks,
and each estimator's declared capabilities (`estimator_spec(kind)`), read by every service.

This package imports nothing else of the project: tensors and plain numbers in, tensors out.
"""

from asyncopd.opd.corrections import m2po_mask
from asyncopd.opd.estimators import (
    MCTerms,
    forward_kl_full,
    forward_kl_topk,
    reverse_kl_full,
    reverse_kl_mc,
    reverse_kl_mc_terms,
    reverse_kl_topk,
)
from asyncopd.opd.head import ProjectedLogits
from asyncopd.opd.loss import ESTIMATOR_KINDS, LossInputs, LossOutputs, OPDLoss, token_mean
from asyncopd.opd.numerics import LOGPROB_FLOOR
from asyncopd.opd.specs import ESTIMATOR_SPECS, EstimatorSpec, Support, estimator_spec
from asyncopd.opd.vocab import Logits, gather_logprobs

__all__ = [
    "ESTIMATOR_KINDS",
    "ESTIMATOR_SPECS",
    "LOGPROB_FLOOR",
    "EstimatorSpec",
    "Logits",
    "LossInputs",
    "LossOutputs",
    "MCTerms",
    "OPDLoss",
    "ProjectedLogits",
    "Support",
    "estimator_spec",
    "forward_kl_full",
    "forward_kl_topk",
    "gather_logprobs",
    "m2po_mask",
    "reverse_kl_full",
    "reverse_kl_mc",
    "reverse_kl_mc_terms",
    "reverse_kl_topk",
    "token_mean",
]
