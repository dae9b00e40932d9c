"""Estimator specs: every configurable kind has one, and each agrees with what its estimator consumes.

The services read these declarations instead of parsing kind names, so a wrong flag would
silently feed an estimator the wrong inputs. Each declared property is checked against the
estimator itself: its signature, what `OPDLoss` refuses to run without, the config's tail
rule, and (for `direction`) the value it computes where the estimate is exact.
"""

from __future__ import annotations

import inspect
from typing import get_args, get_type_hints

import pytest
import torch
from asyncopd.config.loss import EstimatorKind, LossConfig
from asyncopd.config.run import DENSE_TEACHER_KINDS, ROLLOUT_SUPPORT_KINDS
from asyncopd.opd import ESTIMATOR_KINDS, ESTIMATOR_SPECS, LossInputs, OPDLoss, Support, estimator_spec
from asyncopd.opd.loss import EstimatorKind as LossEstimatorKind
from pydantic import ValidationError

pytestmark = pytest.mark.unit

F64 = torch.float64
KINDS = sorted(ESTIMATOR_SPECS)
# the name an estimator function gives its ids says where they come from
_IDS_PARAMETER = {
    "teacher_ids": Support.TEACHER_TOPK,
    "support_ids": Support.STUDENT_TOPK,
    "sample_ids": Support.MC_SAMPLES,
}


def test_every_configurable_kind_has_a_spec() -> None:
    assert set(get_args(EstimatorKind)) == set(ESTIMATOR_SPECS)
    assert set(get_args(LossEstimatorKind)) == set(ESTIMATOR_SPECS)
    assert set(ESTIMATOR_KINDS) == set(ESTIMATOR_SPECS)
    for kind, spec in ESTIMATOR_SPECS.items():
        assert spec.kind == kind
        assert estimator_spec(kind) is spec


def test_the_torch_free_config_rules_agree_with_the_specs() -> None:
    # config/ cannot import opd (torch), so its load-time rules keep their own kind sets
    assert {k for k, s in ESTIMATOR_SPECS.items() if s.needs_teacher_logits} == DENSE_TEACHER_KINDS
    recorded = {Support.STUDENT_TOPK, Support.MC_SAMPLES}
    assert {k for k, s in ESTIMATOR_SPECS.items() if s.support in recorded} == ROLLOUT_SUPPORT_KINDS


def test_unknown_kind_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown estimator kind 'forward_kl_sparse'.*reverse_kl_mc"):
        estimator_spec("forward_kl_sparse")


@pytest.mark.parametrize("kind", KINDS)
def test_spec_matches_the_estimator_signature(kind: str) -> None:
    spec = ESTIMATOR_SPECS[kind]
    parameters = inspect.signature(spec.estimator).parameters
    assert ("teacher_logits" in parameters) == spec.needs_teacher_logits
    assert ("behavior_logprobs" in parameters) == spec.needs_behavior_logprobs
    ids = [name for name in parameters if name in _IDS_PARAMETER]
    assert [_IDS_PARAMETER[name] for name in ids] == ([] if spec.support is Support.DENSE else [spec.support])
    assert spec.needs_teacher_logits == (spec.support is Support.DENSE)
    tails = get_args(get_type_hints(spec.estimator).get("tail", type(None)))
    assert ("renorm" in tails) == spec.renorm_tail


def _inputs(kind: str, seed: int = 0) -> LossInputs:
    """Exactly the inputs the spec declares for `kind` (all of them present)."""
    spec = ESTIMATOR_SPECS[kind]
    g = torch.Generator().manual_seed(seed)
    b, t, v, k = 2, 3, 7, 4
    z = torch.randn((b, t, v), generator=g, dtype=F64).requires_grad_()
    teacher = torch.randn((b, t, v), generator=g, dtype=F64)
    mu = torch.randn((b, t, v), generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).reshape(b, t, k)
    sparse = spec.support is not Support.DENSE
    return LossInputs(
        student_logits=z,
        valid=torch.ones((b, t), dtype=torch.bool),
        ids=ids if sparse else None,
        teacher_logprobs=torch.log_softmax(teacher, -1).gather(-1, ids) if sparse else None,
        behavior_logprobs=torch.log_softmax(mu, -1).gather(-1, ids) if spec.needs_behavior_logprobs else None,
        teacher_logits=teacher if spec.needs_teacher_logits else None,
    )


def _present(inputs: LossInputs) -> list[str]:
    return [
        name
        for name in ("ids", "teacher_logprobs", "behavior_logprobs", "teacher_logits")
        if getattr(inputs, name) is not None
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_runs_on_the_declared_inputs_and_needs_each_of_them(kind: str) -> None:
    loss = OPDLoss(kind, tail="bucket", correction="is")  # type: ignore[arg-type]
    assert loss.spec is ESTIMATOR_SPECS[kind]
    inputs = _inputs(kind)
    out = loss(inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    declared = _present(inputs)
    assert declared, f"{kind} declares no input beyond the student's logits"
    for name in declared:
        missing = LossInputs(**{**inputs.__dict__, name: None})
        with pytest.raises(ValueError, match=f"LossInputs.{name}"):
            loss(missing)


@pytest.mark.parametrize("kind", KINDS)
def test_renorm_tail_is_accepted_exactly_where_declared(kind: str) -> None:
    spec = ESTIMATOR_SPECS[kind]
    if spec.renorm_tail:
        assert LossConfig(kind=kind, tail="renorm").tail == "renorm"  # type: ignore[arg-type]
        OPDLoss(kind, tail="renorm")  # type: ignore[arg-type]
    else:
        with pytest.raises(ValidationError, match="renorm"):
            LossConfig(kind=kind, tail="renorm")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="renorm"):
            OPDLoss(kind, tail="renorm")  # type: ignore[arg-type]


def _exact_inputs(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> LossInputs:
    """Inputs on which `kind`'s KL estimate is exact (all V ids) or, for MC, N ≫ V draws from μ = π."""
    spec = ESTIMATOR_SPECS[kind]
    v = student.shape[-1]
    log_pi, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    if spec.support is Support.DENSE:
        return LossInputs(student, torch.ones(1, dtype=torch.bool), teacher_logits=teacher)
    if spec.support is Support.MC_SAMPLES:
        g = torch.Generator().manual_seed(7)
        ids = torch.multinomial(log_pi.exp(), 200_000, replacement=True, generator=g)
        return LossInputs(
            student,
            torch.ones(1, dtype=torch.bool),
            ids=ids,
            teacher_logprobs=log_p.gather(-1, ids),
            behavior_logprobs=log_pi.gather(-1, ids),
        )
    ids = torch.arange(v).unsqueeze(0)
    return LossInputs(student, torch.ones(1, dtype=torch.bool), ids=ids, teacher_logprobs=log_p.gather(-1, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_direction_matches_the_kl_the_estimator_computes(kind: str) -> None:
    # a peaked student against a uniform teacher: forward KL 3.20 nats, reverse 1.54
    student = torch.tensor([[6.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    teacher = torch.zeros((1, 5), dtype=F64)
    log_pi, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    forward = float((log_p.exp() * (log_p - log_pi)).sum())
    reverse = float((log_pi.exp() * (log_pi - log_p)).sum())
    assert abs(forward - reverse) > 1.5
    kl = OPDLoss(kind, tail="drop")(_exact_inputs(kind, student, teacher)).metrics["kl"]  # type: ignore[arg-type]
    expected = forward if ESTIMATOR_SPECS[kind].direction == "forward" else reverse
    assert kl == pytest.approx(expected, abs=0.02)
