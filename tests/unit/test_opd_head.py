"""ProjectedLogits: the estimators on hidden states + LM head, a chunk of positions at a time,
against the same estimators on the materialised logits and against naive formulas."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from asyncopd.opd import LossInputs, OPDLoss, ProjectedLogits, gather_logprobs
from asyncopd.opd.head import project_chunks
from asyncopd.opd.vocab import dense_forward_kl, dense_reverse_kl, gather_logits
from torch import Tensor

pytestmark = pytest.mark.unit

F64 = torch.float64
B, T, H, V, K = 2, 7, 6, 13, 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leaves(seed: int = 0, dtype: torch.dtype = F64, bias: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    hidden = torch.randn((B, T, H), generator=gen(seed), dtype=dtype).requires_grad_()
    weight = torch.randn((V, H), generator=gen(seed + 1), dtype=dtype).requires_grad_()
    b = torch.randn((V,), generator=gen(seed + 2), dtype=dtype).requires_grad_() if bias else None
    return hidden, weight, b


def inputs(student: Any, teacher: Any, seed: int = 0) -> LossInputs:
    """A batch with padding at the end of both rows; μ ≠ π_θ and π_prox between them."""
    z = student.materialize().detach() if isinstance(student, ProjectedLogits) else student.detach()
    t = teacher.materialize() if isinstance(teacher, ProjectedLogits) else teacher
    mu_logits = z + torch.randn(z.shape, generator=gen(seed + 5), dtype=z.dtype)
    prox_logits = 0.5 * (z + mu_logits)
    ids = torch.multinomial(torch.softmax(mu_logits, -1).reshape(-1, V), K, generator=gen(seed + 6)).reshape(B, T, K)
    valid = torch.ones((B, T), dtype=torch.bool)
    valid[0, 5:] = False
    valid[1, 6:] = False
    return LossInputs(
        student_logits=student,
        valid=valid,
        ids=ids,
        teacher_logprobs=torch.log_softmax(t, -1).gather(-1, ids),
        behavior_logprobs=torch.log_softmax(mu_logits, -1).gather(-1, ids),
        proximal_logprobs=torch.log_softmax(prox_logits, -1).gather(-1, ids),
        teacher_logits=teacher,
    )


CASES: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl_topk", {"tail": "drop"}),
    ("forward_kl_topk", {"tail": "bucket"}),
    ("forward_kl_topk", {"tail": "renorm"}),
    ("reverse_kl_topk", {"tail": "drop"}),
    ("reverse_kl_topk", {"tail": "bucket"}),
    *[
        ("reverse_kl_mc", {"correction": c, "advantage": a})
        for c in ("is", "none", "ppo_clip", "decoupled", "m2po", "m2po_clip")
        for a in ("recompute", "rollout")
    ],
    ("reverse_kl_mc", {"correction": "decoupled", "decoupled_mode": "truncate"}),
    ("reverse_kl_mc", {"correction": "m2po_clip", "m2po_budget": 1.0}),
    ("forward_kl_full", {}),
    ("reverse_kl_full", {}),
]


def run(loss: OPDLoss, x: LossInputs, params: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, float], list[Tensor]]:
    out = loss(x)
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), out.metrics, list(grads)


@pytest.mark.parametrize(("kind", "options"), CASES, ids=str)
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_every_estimator_gives_the_same_loss_metrics_and_gradients_chunked(
    kind: str, options: dict[str, Any], chunk: int
) -> None:
    """Loss, metrics and the gradients of hidden states, weight and bias match the materialised logits."""
    hidden, weight, bias = leaves()
    t_hidden = torch.randn((B, T, H), generator=gen(9), dtype=F64)
    t_weight = torch.randn((V, H), generator=gen(10), dtype=F64)
    params = (hidden, weight, bias)
    assert bias is not None
    projected = ProjectedLogits(hidden, weight, bias, chunk_positions=chunk)
    teacher_projected = ProjectedLogits(t_hidden, t_weight, None, chunk_positions=chunk)
    # (a ppo clip of 0.05 makes some samples clip, so the clipped branch is compared too)
    loss = OPDLoss(kind, clip_eps=0.05, **options)  # type: ignore[arg-type]
    chunked = run(loss, inputs(projected, teacher_projected), params)
    naive = run(loss, inputs(hidden @ weight.t() + bias, t_hidden @ t_weight.t()), params)
    torch.testing.assert_close(chunked[0], naive[0], rtol=1e-10, atol=1e-12)
    assert chunked[1].keys() == naive[1].keys()
    for name in naive[1]:
        assert chunked[1][name] == pytest.approx(naive[1][name], rel=1e-9, abs=1e-12), name
    for got, want in zip(chunked[2], naive[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if kind == "reverse_kl_mc" and options["correction"] == "ppo_clip":
        assert 0 < naive[1]["clipped_fraction"] < 1, "the case must exercise both PPO branches"


def test_gather_and_dense_kernels_match_the_naive_formulas() -> None:
    hidden, weight, bias = leaves(3)
    assert bias is not None
    t_hidden = torch.randn((B, T, H), generator=gen(4), dtype=F64)
    t_weight = torch.randn((V, H), generator=gen(5), dtype=F64)
    ids = torch.randint(0, V, (B, T, K), generator=gen(6))
    projected = ProjectedLogits(hidden, weight, bias, chunk_positions=4)
    teacher = ProjectedLogits(t_hidden, t_weight, chunk_positions=5)
    log_pi = torch.log_softmax(hidden @ weight.t() + bias, -1)
    log_p = torch.log_softmax(t_hidden @ t_weight.t(), -1)
    naive = {
        "gather": log_pi.gather(-1, ids),
        "logits": (hidden @ weight.t() + bias).gather(-1, ids),
        "reverse": (log_pi.exp() * (log_pi - log_p)).sum(-1),
        "forward": (log_p.exp() * (log_p - log_pi)).sum(-1),
    }
    got = {
        "gather": gather_logprobs(projected, ids),
        "logits": gather_logits(projected, ids),
        "reverse": dense_reverse_kl(projected, teacher),
        "forward": dense_forward_kl(projected, teacher),
    }
    weights = {name: torch.randn(naive[name].shape, generator=gen(7), dtype=F64) for name in naive}
    for name, want in naive.items():
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad((got[name] * weights[name]).sum(), (hidden, weight, bias))
        g_want = torch.autograd.grad((want * weights[name]).sum(), (hidden, weight, bias), retain_graph=True)
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_no_grad_forward_and_a_teacher_given_as_a_tensor() -> None:
    hidden, weight, _ = leaves(bias=False)
    projected = ProjectedLogits(hidden, weight, chunk_positions=2)
    teacher = torch.randn((B, T, V), generator=gen(8), dtype=F64)
    ids = torch.randint(0, V, (B, T, K), generator=gen(9))
    with torch.no_grad():
        lp = gather_logprobs(projected, ids)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(-1, ids))
    torch.testing.assert_close(dense_reverse_kl(projected, teacher), dense_reverse_kl(projected.materialize(), teacher))


def test_a_bfloat16_projection_matches_a_bfloat16_head() -> None:
    """matmul_dtype=bf16 with fp32 leaves: the logits of an autocast LM head; grads come back fp32."""
    hidden, weight, _ = leaves(dtype=torch.float32, bias=False)
    ids = torch.randint(0, V, (B, T, K), generator=gen(11))
    chunked = gather_logprobs(ProjectedLogits(hidden, weight, chunk_positions=3, matmul_dtype=torch.bfloat16), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.t()
    assert logits.dtype == torch.bfloat16
    naive = gather_logprobs(logits, ids)
    torch.testing.assert_close(chunked, naive)
    g_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    g_naive = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(g_chunked, g_naive, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_bad_shapes_and_chunks_are_named() -> None:
    hidden, weight, _ = leaves(bias=False)
    with pytest.raises(ValueError, match="chunk_positions"):
        ProjectedLogits(hidden, weight, chunk_positions=0)
    with pytest.raises(ValueError, match="expected weight"):
        ProjectedLogits(hidden, weight.t())
    with pytest.raises(ValueError, match="bias shape"):
        ProjectedLogits(hidden, weight, torch.zeros(V + 1, dtype=F64))
    with pytest.raises(ValueError, match="leading shape"):
        project_chunks(lambda z, i: z.gather(-1, i), ProjectedLogits(hidden, weight), torch.zeros((B, T + 1, K)))
    assert ProjectedLogits(hidden, weight).shape == (B, T, V)
