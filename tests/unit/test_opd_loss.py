"""OPDLoss: LossInputs -> LossOutputs, the token-mean reduction and the learner-facing metrics."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from asyncopd.config.loss import EstimatorKind, LossConfig
from asyncopd.opd import (
    ESTIMATOR_KINDS,
    LossInputs,
    OPDLoss,
    forward_kl_full,
    forward_kl_topk,
    reverse_kl_full,
    reverse_kl_mc,
    reverse_kl_mc_terms,
    reverse_kl_topk,
    token_mean,
)
from torch import Tensor

pytestmark = pytest.mark.unit

F64 = torch.float64
B, T, V, K = 2, 5, 11, 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(seed: int = 0) -> LossInputs:
    """A [B, T] batch whose last positions are padding; μ ≠ π, π_prox between them."""
    z = (torch.randn((B, T, V), generator=gen(seed), dtype=F64) * 2).requires_grad_()
    teacher = torch.randn((B, T, V), generator=gen(seed + 1), dtype=F64) * 2
    mu_logits = z.detach() + torch.randn((B, T, V), generator=gen(seed + 2), dtype=F64)
    prox_logits = 0.5 * (z.detach() + mu_logits)
    ids = torch.multinomial(torch.softmax(mu_logits, -1).reshape(-1, V), K, generator=gen(seed + 3))
    ids = ids.reshape(B, T, K)
    valid = torch.ones((B, T), dtype=torch.bool)
    valid[0, 3:] = False
    valid[1, 4:] = False
    return LossInputs(
        student_logits=z,
        valid=valid,
        ids=ids,
        teacher_logprobs=torch.log_softmax(teacher, -1).gather(-1, ids),
        behavior_logprobs=torch.log_softmax(mu_logits, -1).gather(-1, ids),
        proximal_logprobs=torch.log_softmax(prox_logits, -1).gather(-1, ids),
        teacher_logits=teacher,
    )


def test_kinds_match_the_config_schema() -> None:
    assert set(ESTIMATOR_KINDS) == set(get_args(EstimatorKind))
    config = LossConfig()
    # every LossConfig default maps onto OPDLoss's plain arguments
    OPDLoss(
        config.kind,
        tail=config.tail,
        advantage=config.advantage,
        correction=config.correction,
        clip_eps=config.clip_eps,
        behavior_weight_cap=config.behavior_weight_cap,
        m2po_tau=config.m2po_tau,
        decoupled_mode=config.decoupled_mode,
        m2po_budget=config.m2po_budget,
    )
    # and the learner's mapping carries every knob (a new LossConfig field must reach OPDLoss)
    from asyncopd.learner.trainer import loss_from_config

    custom = LossConfig(
        correction="m2po_clip", decoupled_mode="truncate", m2po_budget=0.04, m2po_tau=0.1, baseline="mean"
    )
    loss = loss_from_config(custom)
    assert (loss.correction, loss.decoupled_mode, loss.m2po_budget, loss.m2po_tau, loss.baseline) == (
        "m2po_clip",
        "truncate",
        0.04,
        0.1,
        "mean",
    )


def test_a_baseline_is_refused_where_it_means_nothing() -> None:
    with pytest.raises(ValueError, match="baseline='mean' needs kind='reverse_kl_mc' with k >= 2"):
        LossConfig(kind="reverse_kl_mc", k=1, baseline="mean")
    with pytest.raises(ValueError, match="baseline='mean' needs kind='reverse_kl_mc'"):
        LossConfig(kind="forward_kl_topk", baseline="mean")
    with pytest.raises(ValueError, match="applies to the MC estimator"):
        OPDLoss("reverse_kl_topk", baseline="mean")


def direct(x: LossInputs, kind: str, tail: str) -> Tensor:
    assert x.ids is not None and x.teacher_logprobs is not None and x.teacher_logits is not None
    z = x.student_logits
    if kind == "forward_kl_full":
        return forward_kl_full(z, x.teacher_logits)
    if kind == "reverse_kl_full":
        return reverse_kl_full(z, x.teacher_logits)
    if kind == "forward_kl_topk":
        return forward_kl_topk(z, x.ids, x.teacher_logprobs, tail=tail)  # type: ignore[arg-type]
    if kind == "reverse_kl_topk":
        return reverse_kl_topk(z, x.ids, x.teacher_logprobs, tail=tail)  # type: ignore[arg-type]
    assert x.behavior_logprobs is not None
    return reverse_kl_mc(z, x.ids, x.teacher_logprobs, x.behavior_logprobs, mask=x.valid)


@pytest.mark.parametrize(
    ("kind", "tail"),
    [
        ("forward_kl_full", "bucket"),
        ("reverse_kl_full", "bucket"),
        ("forward_kl_topk", "renorm"),
        ("forward_kl_topk", "bucket"),
        ("reverse_kl_topk", "drop"),
        ("reverse_kl_mc", "bucket"),
    ],
)
def test_loss_is_the_token_mean_of_the_estimator(kind: str, tail: str) -> None:
    x = batch()
    out = OPDLoss(kind, tail=tail)(x)  # type: ignore[arg-type]
    per_position = direct(x, kind, tail)
    expected = per_position[x.valid].sum() / x.valid.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, x.student_logits)
    (expected_grad,) = torch.autograd.grad(expected, x.student_logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert bool((grad[~x.valid] == 0).all())
    assert out.metrics["valid_tokens"] == 7.0
    assert out.metrics["loss"] == pytest.approx(float(expected.detach()))
    assert bool((out.per_position[~x.valid] == 0).all())
    if kind != "reverse_kl_mc":
        assert out.metrics["kl"] == pytest.approx(float(expected.detach()))


def test_mc_metrics_report_ratios_clipping_and_masking() -> None:
    x = batch(5)
    assert x.ids is not None and x.teacher_logprobs is not None and x.behavior_logprobs is not None
    eps = 0.1
    out = OPDLoss("reverse_kl_mc", correction="ppo_clip", clip_eps=eps)(x)
    ratio = torch.exp(torch.log_softmax(x.student_logits.detach(), -1).gather(-1, x.ids) - x.behavior_logprobs)
    tokens = x.valid.unsqueeze(-1).expand_as(ratio)
    assert out.metrics["ratio_mean"] == pytest.approx(float(ratio[tokens].mean()))
    assert out.metrics["ratio_min"] == pytest.approx(float(ratio[tokens].min()))
    assert out.metrics["ratio_max"] == pytest.approx(float(ratio[tokens].max()))
    terms = reverse_kl_mc_terms(
        x.student_logits, x.ids, x.teacher_logprobs, x.behavior_logprobs, correction="ppo_clip", clip_eps=eps
    )
    clipped = float(terms.clipped[tokens].double().mean())
    assert 0 < clipped < 1
    assert out.metrics["clipped_fraction"] == pytest.approx(clipped)
    assert out.metrics["masked_fraction"] == 0.0


def test_m2po_masked_tokens_count_in_the_denominator() -> None:
    x = batch(7)
    assert x.ids is not None and x.teacher_logprobs is not None and x.behavior_logprobs is not None
    tau = 0.2
    out = OPDLoss("reverse_kl_mc", correction="m2po", m2po_tau=tau)(x)
    terms = reverse_kl_mc_terms(
        x.student_logits,
        x.ids,
        x.teacher_logprobs,
        x.behavior_logprobs,
        correction="m2po",
        m2po_tau=tau,
        mask=x.valid,
    )
    tokens = x.valid.unsqueeze(-1).expand_as(terms.kept)
    masked = float((tokens & ~terms.kept).sum()) / float(tokens.sum())
    assert 0 < masked < 1
    assert out.metrics["masked_fraction"] == pytest.approx(masked)
    # masked samples add 0; the denominator is still every valid position (and N per position)
    expected = terms.surrogate.sum() / (x.valid.sum() * K)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_decoupled_reports_capped_samples_as_masked() -> None:
    x = batch(9)
    assert x.proximal_logprobs is not None and x.behavior_logprobs is not None
    cap = 1.2
    weights = torch.exp(x.proximal_logprobs - x.behavior_logprobs)
    tokens = x.valid.unsqueeze(-1).expand_as(weights)
    over = float((weights[tokens] > cap).double().mean())
    assert 0 < over < 1
    out = OPDLoss("reverse_kl_mc", correction="decoupled", behavior_weight_cap=cap)(x)
    assert out.metrics["masked_fraction"] == pytest.approx(over)


def test_mc_kl_metric_is_an_unbiased_reverse_kl_estimate() -> None:
    """With μ-proportional "samples" the importance-weighted estimate equals KL(π‖p) exactly."""
    counts = torch.tensor([1, 2, 3, 4, 5, 5])
    ids = torch.repeat_interleave(torch.arange(6), counts)[None]
    z = torch.randn((1, 6), generator=gen(3), dtype=F64)
    teacher = torch.randn((1, 6), generator=gen(4), dtype=F64)
    log_mu = torch.log(counts.to(F64) / counts.sum())
    x = LossInputs(
        student_logits=z,
        valid=torch.ones(1, dtype=torch.bool),
        ids=ids,
        teacher_logprobs=torch.log_softmax(teacher, -1).gather(-1, ids),
        behavior_logprobs=log_mu[ids],
    )
    out = OPDLoss("reverse_kl_mc")(x)
    assert out.metrics["kl"] == pytest.approx(float(reverse_kl_full(z, teacher)[0]), rel=1e-10)


def test_token_mean() -> None:
    values = torch.tensor([1.0, math.nan, 3.0, math.inf])
    valid = torch.tensor([True, False, True, False])
    assert float(token_mean(values, valid)) == 2.0
    empty = token_mean(values, torch.zeros(4, dtype=torch.bool))
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="valid shape"):
        token_mean(values, valid[:3])


def test_bad_settings_and_missing_inputs_raise() -> None:
    with pytest.raises(ValueError, match="renorm"):
        OPDLoss("reverse_kl_topk", tail="renorm")
    with pytest.raises(ValueError, match="kind must be one of"):
        OPDLoss("reverse_kl_dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_eps"):
        OPDLoss(clip_eps=1.5)
    x = batch()
    no_prox = LossInputs(
        student_logits=x.student_logits,
        valid=x.valid,
        ids=x.ids,
        teacher_logprobs=x.teacher_logprobs,
        behavior_logprobs=x.behavior_logprobs,
    )
    with pytest.raises(ValueError, match=r"LossInputs\.proximal_logprobs"):
        OPDLoss("reverse_kl_mc", correction="decoupled")(no_prox)
    with pytest.raises(ValueError, match=r"LossInputs\.teacher_logits"):
        OPDLoss("forward_kl_full")(no_prox)
    with pytest.raises(ValueError, match="valid shape"):
        OPDLoss("forward_kl_topk")(
            LossInputs(
                student_logits=x.student_logits, valid=x.valid[0], ids=x.ids, teacher_logprobs=x.teacher_logprobs
            )
        )
