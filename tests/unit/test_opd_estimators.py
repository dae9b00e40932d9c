"""asyncopd.opd estimators against naive per-position loops written straight from docs/opd-math.md.

The naive references use float64 scalar arithmetic (one position, one vocabulary entry at a
time) so that they share no code or vectorisation trick with the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from asyncopd.opd import (
    ProjectedLogits,
    forward_kl_full,
    forward_kl_topk,
    gather_logprobs,
    reverse_kl_full,
    reverse_kl_mc,
    reverse_kl_topk,
)
from asyncopd.opd.vocab import dense_forward_kl, dense_reverse_kl
from torch import Tensor

pytestmark = pytest.mark.unit

F64 = torch.float64
LEAD = (2, 3)
V = 13
K = 5
N = 6


# ---------------------------------------------------------------- naive references (float64 loops)


def tsum(terms: Iterable[Tensor]) -> Tensor:
    """Python-level sum of 0-d tensors (typed, unlike builtin sum's int start)."""
    return torch.stack(list(terms)).sum()


def naive_log_softmax(z: Tensor) -> list[Tensor]:
    """log π(v) for one position's logits z [V], as a list of 0-d tensors (autograd through them)."""
    log_z = torch.log(tsum(torch.exp(z[v]) for v in range(z.shape[0])))
    return [z[v] - log_z for v in range(z.shape[0])]


def per_position(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """Apply fn(position slices...) to every position of [..., X] tensors; stack to [...]."""
    lead = tensors[0].shape[:-1]
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    values = [fn(*(t[i] for t in flat)) for i in range(flat[0].shape[0])]
    return torch.stack(values).reshape(lead)


def naive_forward_full(z: Tensor, t: Tensor) -> Tensor:
    log_pi, log_p = naive_log_softmax(z), naive_log_softmax(t)
    return tsum(torch.exp(log_p[v]) * (log_p[v] - log_pi[v]) for v in range(len(log_pi)))


def naive_reverse_full(z: Tensor, t: Tensor) -> Tensor:
    log_pi, log_p = naive_log_softmax(z), naive_log_softmax(t)
    return tsum(torch.exp(log_pi[v]) * (log_pi[v] - log_p[v]) for v in range(len(log_pi)))


def naive_forward_topk(tail: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def one(z: Tensor, ids: Tensor, lt: Tensor) -> Tensor:
        log_pi = naive_log_softmax(z)
        pi = [torch.exp(log_pi[int(i)]) for i in ids]
        p = [torch.exp(lt[k]) for k in range(len(ids))]
        if tail == "renorm":
            sp, spi = tsum(p), tsum(pi)
            return tsum(p[k] / sp * torch.log((p[k] / sp) / (pi[k] / spi)) for k in range(len(ids)))
        kl = tsum(p[k] * (lt[k] - log_pi[int(ids[k])]) for k in range(len(ids)))
        if tail == "bucket":
            p_tail, pi_tail = 1 - tsum(p), 1 - tsum(pi)
            kl = kl + p_tail * torch.log(p_tail / pi_tail)
        return kl

    return one


def naive_reverse_topk(tail: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def one(z: Tensor, ids: Tensor, lt: Tensor) -> Tensor:
        log_pi = naive_log_softmax(z)
        kl = tsum(torch.exp(log_pi[int(ids[k])]) * (log_pi[int(ids[k])] - lt[k]) for k in range(len(ids)))
        if tail == "bucket":
            pi_tail = 1 - tsum(torch.exp(log_pi[int(i)]) for i in ids)
            p_tail = 1 - tsum(torch.exp(lt[k]) for k in range(len(ids)))
            kl = kl + pi_tail * torch.log(pi_tail / p_tail)
        return kl

    return one


def naive_mc(
    advantage: str, correction: str, clip_eps: float = 0.2, cap: float = 5.0, baseline: str = "none"
) -> Callable[..., Tensor]:
    """(1/N) Σ_j ℓ_j per the doc; M2PO is handled by the caller via an explicit keep mask."""

    # one argument per per-position slice, in the order `per_position` passes them
    def one(z: Tensor, ids: Tensor, lt: Tensor, lmu: Tensor, lprox: Tensor, keep: Tensor) -> Tensor:  # noqa: PLR0917
        log_pi = naive_log_softmax(z)
        total = torch.zeros((), dtype=F64)
        n = len(ids)
        raw = [
            (lt[j] - log_pi[int(ids[j])].detach()) if advantage == "recompute" else (lt[j] - lmu[j]) for j in range(n)
        ]
        advantages = raw
        if baseline == "mean":  # each sample's advantage minus the mean of the others' at its position
            advantages = [raw[j] - sum(raw[i] for i in range(n) if i != j) / (n - 1) for j in range(n)]
        for j in range(n):
            lpi = log_pi[int(ids[j])]
            a = advantages[j]
            r = torch.exp(lpi - lmu[j])
            if not bool(keep[j]):
                continue
            if correction in ("is", "m2po"):
                term = -r * a
            elif correction == "none":
                term = -lpi * a
            elif correction == "ppo_clip":
                unclipped, clipped = -r * a, -torch.clamp(r, 1 - clip_eps, 1 + clip_eps) * a
                term = unclipped if unclipped >= clipped else clipped
            else:
                b = math.exp(float(lprox[j] - lmu[j]))
                if b > cap:
                    continue
                rp = torch.exp(lpi - lprox[j])
                unclipped, clipped = -rp * a, -torch.clamp(rp, 1 - clip_eps, 1 + clip_eps) * a
                term = b * (unclipped if unclipped >= clipped else clipped)
            total = total + term
        return total / len(ids)

    return one


# ---------------------------------------------------------------- inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(seed: int, lead: tuple[int, ...] = LEAD, vocab: int = V, scale: float = 2.0) -> Tensor:
    return (torch.randn((*lead, vocab), generator=gen(seed), dtype=F64) * scale).requires_grad_()


def distinct_ids(seed: int, lead: tuple[int, ...] = LEAD, vocab: int = V, k: int = K) -> Tensor:
    g = gen(seed)
    rows = [torch.randperm(vocab, generator=g)[:k] for _ in range(math.prod(lead))]
    return torch.stack(rows).reshape((*lead, k))


def grad_of(value: Tensor, wrt: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value.sum(), wrt)
    return grad


def assert_value_and_grad(ours: Tensor, ref: Tensor, wrt: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_of(ours, wrt), grad_of(ref, wrt), rtol=1e-8, atol=tol)


# ---------------------------------------------------------------- equality with the naive loops


def test_dense_kls_match_naive() -> None:
    z, t = logits(1), logits(2).detach()
    assert_value_and_grad(forward_kl_full(z, t), per_position(naive_forward_full, z, t), z)
    assert_value_and_grad(reverse_kl_full(z, t), per_position(naive_reverse_full, z, t), z)


@pytest.mark.parametrize("tail", ["drop", "bucket", "renorm"])
def test_forward_kl_topk_matches_naive(tail: str) -> None:
    z, t = logits(3), logits(4).detach()
    ids = distinct_ids(5)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    ours = forward_kl_topk(z, ids, lt, tail=tail)  # type: ignore[arg-type]
    assert_value_and_grad(ours, per_position(naive_forward_topk(tail), z, ids, lt), z)


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_reverse_kl_topk_matches_naive(tail: str) -> None:
    z, t = logits(6), logits(7).detach()
    ids = distinct_ids(8)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    ours = reverse_kl_topk(z, ids, lt, tail=tail)  # type: ignore[arg-type]
    assert_value_and_grad(ours, per_position(naive_reverse_topk(tail), z, ids, lt), z)


def mc_inputs(seed: int) -> dict[str, Tensor]:
    """Student z, behaviour μ ≠ π (a perturbed student), teacher p, proximal π_prox; N ids ~ μ."""
    z = logits(seed)
    mu_logits = z.detach() + torch.randn(z.shape, generator=gen(seed + 1), dtype=F64)
    prox_logits = z.detach() + 0.5 * torch.randn(z.shape, generator=gen(seed + 2), dtype=F64)
    t = logits(seed + 3).detach()
    probs = torch.softmax(mu_logits, -1).reshape(-1, V)
    ids = torch.multinomial(probs, N, replacement=True, generator=gen(seed + 4)).reshape((*LEAD, N))
    return {
        "z": z,
        "ids": ids,
        "lt": torch.log_softmax(t, -1).gather(-1, ids),
        "lmu": torch.log_softmax(mu_logits, -1).gather(-1, ids),
        "lprox": torch.log_softmax(prox_logits, -1).gather(-1, ids),
    }


@pytest.mark.parametrize("advantage", ["recompute", "rollout"])
@pytest.mark.parametrize("correction", ["is", "none", "ppo_clip", "decoupled"])
def test_reverse_kl_mc_matches_naive(advantage: str, correction: str) -> None:
    x = mc_inputs(10)
    # a small cap so that some behaviour weights π_prox/μ exceed it and the zeroing is exercised
    cap = 1.5
    assert bool((x["lprox"] - x["lmu"]).exp().gt(cap).any())
    ours = reverse_kl_mc(
        x["z"],
        x["ids"],
        x["lt"],
        x["lmu"],
        advantage=advantage,  # type: ignore[arg-type]
        correction=correction,  # type: ignore[arg-type]
        proximal_logprobs=x["lprox"],
        behavior_weight_cap=cap,
    )
    keep = torch.ones_like(x["ids"], dtype=torch.bool)
    ref = per_position(naive_mc(advantage, correction, cap=cap), x["z"], x["ids"], x["lt"], x["lmu"], x["lprox"], keep)
    assert_value_and_grad(ours, ref, x["z"])


@pytest.mark.parametrize("advantage", ["recompute", "rollout"])
@pytest.mark.parametrize("correction", ["none", "is", "ppo_clip"])
def test_reverse_kl_mc_mean_baseline_matches_naive(advantage: str, correction: str) -> None:
    x = mc_inputs(11)
    kw: dict[str, Any] = {"advantage": advantage, "correction": correction}
    ours = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], baseline="mean", **kw)
    keep = torch.ones_like(x["ids"], dtype=torch.bool)
    ref = per_position(
        naive_mc(advantage, correction, baseline="mean"), x["z"], x["ids"], x["lt"], x["lmu"], x["lprox"], keep
    )
    assert_value_and_grad(ours, ref, x["z"])
    again = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], baseline="mean", **kw)
    plain = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], **kw)
    assert not torch.allclose(grad_of(again, x["z"]), grad_of(plain, x["z"])), "the baseline changed nothing"


def test_the_mean_baseline_leaves_the_on_policy_gradient_unbiased() -> None:
    # μ = π_θ, draws from π_θ: averaged over many draws the baseline's gradient is the plain one's
    # (the other samples' mean does not depend on the sample it is subtracted from)
    torch.manual_seed(0)
    z = logits(12, lead=(1,), vocab=6)
    lt = torch.log_softmax(torch.randn(6, dtype=F64), -1)
    probs = torch.softmax(z.detach(), -1)
    draws = torch.multinomial(probs.expand(20000, -1), 4, replacement=True)  # [R, N]
    zz = z.expand(20000, -1)
    lmu = torch.log_softmax(zz.detach(), -1).gather(-1, draws)
    grads = {
        b: grad_of(reverse_kl_mc(zz, draws, lt[draws], lmu, correction="is", baseline=b).mean() * 20000, z)
        for b in ("none", "mean")
    }
    torch.testing.assert_close(grads["mean"] / 20000, grads["none"] / 20000, atol=0.02, rtol=0.0)


def test_the_mean_baseline_needs_two_samples_and_the_mc_estimator() -> None:
    x = mc_inputs(13)
    with pytest.raises(ValueError, match="N >= 2"):
        reverse_kl_mc(x["z"], x["ids"][..., :1], x["lt"][..., :1], x["lmu"][..., :1], baseline="mean")
    with pytest.raises(ValueError, match="baseline must be one of"):
        reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], baseline="median")  # type: ignore[arg-type]


def test_reverse_kl_mc_m2po_and_mask_match_naive() -> None:
    x = mc_inputs(20)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    # naive M2PO: drop the largest M = (log π − log μ)² over valid tokens until the kept mean < τ
    with torch.no_grad():
        m = (torch.log_softmax(x["z"], -1).gather(-1, x["ids"]) - x["lmu"]).square()
    tau = 0.5 * float(m[valid].mean())  # a τ that forces some masking
    ours = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], correction="m2po", m2po_tau=tau, mask=valid)
    tokens = [(float(m[i, j, n]), (i, j, n)) for i in range(2) for j in range(3) for n in range(N) if valid[i, j]]
    tokens.sort(reverse=True)
    n_masked = 0
    while sum(v for v, _ in tokens[n_masked:]) / (len(tokens) - n_masked) >= tau:
        n_masked += 1
    assert 0 < n_masked < len(tokens)
    keep = torch.zeros_like(x["ids"], dtype=torch.bool)
    for _, index in tokens[n_masked:]:
        keep[index] = True
    ref = per_position(naive_mc("recompute", "m2po"), x["z"], x["ids"], x["lt"], x["lmu"], x["lprox"], keep)
    assert_value_and_grad(ours, ref, x["z"])
    assert torch.all(ours[~valid] == 0)


def naive_m2po_clip_bounds(lr: list[float], adv: list[float], budget: float) -> tuple[float, float]:
    """The paper code's dynamic bounds, straight from docs/opd-math.md; τ by bisection (not water-filling)."""
    deltas = [-x for x, a in zip(lr, adv, strict=True) if (a > 0 and x > 0) or (a < 0 and x < 0)]
    n = len(deltas)
    low, high = 0.0, 1e5
    if n and sum(d * d for d in deltas) / n > budget:
        lo_t, hi_t = 0.0, max(abs(d) for d in deltas)
        for _ in range(200):
            mid = 0.5 * (lo_t + hi_t)
            if sum(min(d * d, mid * mid) for d in deltas) < budget * n:
                lo_t = mid
            else:
                hi_t = mid
        tau = 0.5 * (lo_t + hi_t)
        low, high = 1 - math.exp(-tau), math.exp(tau) - 1
    return max(low, 0.3), max(high, 0.5)


@pytest.mark.parametrize("advantage", ["recompute", "rollout"])
@pytest.mark.parametrize("regime", ["under budget", "tau bounds", "floored"])
def test_reverse_kl_mc_m2po_clip_matches_naive(advantage: str, regime: str) -> None:
    from asyncopd.opd.corrections import m2po_clip_bounds

    x = mc_inputs(30)
    valid = torch.tensor([[True, True, False], [True, False, True]])
    with torch.no_grad():
        lpi = torch.log_softmax(x["z"], -1).gather(-1, x["ids"])
        lr = lpi - x["lmu"]
        adv = (x["lt"] - lpi) if advantage == "recompute" else (x["lt"] - x["lmu"])
    tokens = valid.unsqueeze(-1).expand_as(lr)
    lr_list, adv_list = lr[tokens].tolist(), adv[tokens].tolist()
    harmful = [d * d for d, a in zip(lr_list, adv_list, strict=True) if (a > 0 and d > 0) or (a < 0 and d < 0)]
    m2 = sum(harmful) / len(harmful)
    budget = {"under budget": 2.0 * m2, "tau bounds": 0.3 * m2, "floored": 1e-4}[regime]
    low, high = naive_m2po_clip_bounds(lr_list, adv_list, budget)
    ours_low, ours_high = m2po_clip_bounds(lr, adv, tokens, budget)
    assert ours_low == pytest.approx(low, rel=1e-9) and ours_high == pytest.approx(high, rel=1e-9)
    # each regime is the one it is named after (so every branch of the rule is exercised)
    if regime == "under budget":
        assert (low, high) == (0.3, 1e5)
    elif regime == "tau bounds":
        assert low > 0.3 and 0.5 < high < 1e5
    else:
        assert (low, high) == (0.3, 0.5)
    ours = reverse_kl_mc(
        x["z"], x["ids"], x["lt"], x["lmu"], advantage=advantage, correction="m2po_clip", m2po_budget=budget, mask=valid
    )

    def one(z: Tensor, ids: Tensor, lt: Tensor, lmu: Tensor) -> Tensor:
        log_pi = naive_log_softmax(z)
        total = torch.zeros((), dtype=F64)
        for j in range(len(ids)):
            lp = log_pi[int(ids[j])]
            a = (lt[j] - lp.detach()) if advantage == "recompute" else (lt[j] - lmu[j])
            r = torch.exp(lp - lmu[j])
            unclipped, clipped = -r * a, -torch.clamp(r, 1 - low, 1 + high) * a
            total = total + (unclipped if unclipped >= clipped else clipped)
        return total / len(ids)

    ref = per_position(one, x["z"], x["ids"], x["lt"], x["lmu"]) * valid
    ours_valid = ours * valid
    torch.testing.assert_close(ours_valid, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_of(ours_valid, x["z"]), grad_of(ref, x["z"]), rtol=1e-7, atol=1e-9)
    assert torch.all(ours[~valid] == 0)


def test_decoupled_truncate_caps_the_behaviour_weight_instead_of_masking() -> None:
    x = mc_inputs(10)
    cap = 1.5
    over = (x["lprox"] - x["lmu"]).exp() > cap
    assert bool(over.any()) and bool((~over).any())
    args = (x["z"], x["ids"], x["lt"], x["lmu"])
    masked = reverse_kl_mc(*args, correction="decoupled", proximal_logprobs=x["lprox"], behavior_weight_cap=cap)
    truncated = reverse_kl_mc(
        *args, correction="decoupled", proximal_logprobs=x["lprox"], behavior_weight_cap=cap, decoupled_mode="truncate"
    )

    def one(z: Tensor, ids: Tensor, lt: Tensor, lmu: Tensor, lprox: Tensor) -> Tensor:
        log_pi = naive_log_softmax(z)
        total = torch.zeros((), dtype=F64)
        for j in range(len(ids)):
            lp = log_pi[int(ids[j])]
            a = lt[j] - lp.detach()
            b = min(math.exp(float(lprox[j] - lmu[j])), cap)
            rp = torch.exp(lp - lprox[j])
            unclipped, clipped = -rp * a, -torch.clamp(rp, 0.8, 1.2) * a
            total = total + b * (unclipped if unclipped >= clipped else clipped)
        return total / len(ids)

    ref = per_position(one, x["z"], x["ids"], x["lt"], x["lmu"], x["lprox"])
    assert_value_and_grad(truncated, ref, x["z"])
    # positions with a weight over the cap differ between the two modes; the others agree
    rows = over.any(-1)
    assert not torch.allclose(masked[rows], truncated[rows])
    torch.testing.assert_close(masked[~rows], truncated[~rows])
    with pytest.raises(ValueError, match="decoupled mode"):
        reverse_kl_mc(*args, correction="decoupled", proximal_logprobs=x["lprox"], decoupled_mode="clamp")  # type: ignore[arg-type]


# ---------------------------------------------------------------- K = |V| reduces to dense


@pytest.mark.parametrize("tail", ["drop", "bucket", "renorm"])
def test_forward_topk_with_full_support_is_dense(tail: str) -> None:
    z, t = logits(30), logits(31).detach()
    ids = distinct_ids(32, k=V)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    assert_value_and_grad(forward_kl_topk(z, ids, lt, tail=tail), forward_kl_full(z, t), z, tol=1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_reverse_topk_with_full_support_is_dense(tail: str) -> None:
    z, t = logits(33), logits(34).detach()
    ids = distinct_ids(35, k=V)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    assert_value_and_grad(reverse_kl_topk(z, ids, lt, tail=tail), reverse_kl_full(z, t), z, tol=1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_full_support_is_dense_in_fp32(tail: str) -> None:
    z = logits(36).detach().float().requires_grad_()
    t = logits(37).detach().float()
    ids = distinct_ids(38, k=V)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    fwd = forward_kl_topk(z, ids, lt, tail=tail)  # type: ignore[arg-type]
    rev = reverse_kl_topk(z, ids, lt, tail=tail)  # type: ignore[arg-type]
    torch.testing.assert_close(fwd, forward_kl_full(z, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rev, reverse_kl_full(z, t), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- student = teacher


def test_zero_loss_and_gradient_when_student_is_teacher() -> None:
    z = logits(40)
    t = z.detach().clone()
    ids = distinct_ids(41)
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    cases = {
        "forward_full": forward_kl_full(z, t),
        "reverse_full": reverse_kl_full(z, t),
        "forward_bucket": forward_kl_topk(z, ids, lt, tail="bucket"),
        "forward_renorm": forward_kl_topk(z, ids, lt, tail="renorm"),
        "reverse_bucket": reverse_kl_topk(z, ids, lt, tail="bucket"),
        "mc_recompute": reverse_kl_mc(z, ids, lt, lt, advantage="recompute"),
    }
    for name, value in cases.items():
        torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-12, rtol=0, msg=name)
        grad = grad_of(value, z)
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0, msg=name)


def test_drop_tail_is_biased_at_equality() -> None:
    """The doc's caveat made concrete: value 0 but a non-zero gradient when the tail is dropped."""
    z = logits(42)
    ids = distinct_ids(43)
    lt = torch.log_softmax(z.detach(), -1).gather(-1, ids)
    for value in (forward_kl_topk(z, ids, lt, tail="drop"), reverse_kl_topk(z, ids, lt, tail="drop")):
        torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-12, rtol=0)
        assert float(grad_of(value, z).abs().max()) > 1e-3


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_and_neg_inf_teacher_are_finite(dtype: torch.dtype) -> None:
    z64 = logits(50).detach()
    z = z64.to(dtype).requires_grad_()
    t = logits(51).detach()
    ids = distinct_ids(52)
    lt = torch.log_softmax(t, -1).gather(-1, ids).to(dtype)
    lt[0, 0, :2] = -math.inf  # tokens the teacher gives zero probability
    lmu = torch.log_softmax(z64, -1).gather(-1, ids).to(dtype)
    t_dense = t.clone()
    t_dense[..., :3] = -math.inf  # a teacher with masked vocabulary entries
    values = {
        "forward_full": forward_kl_full(z, t_dense.to(dtype)),
        "reverse_full": reverse_kl_full(z, t_dense.to(dtype)),
        **{f"forward_{tail}": forward_kl_topk(z, ids, lt, tail=tail) for tail in ("drop", "bucket", "renorm")},
        **{f"reverse_{tail}": reverse_kl_topk(z, ids, lt, tail=tail) for tail in ("drop", "bucket")},
        **{
            f"mc_{c}": reverse_kl_mc(z, ids, lt, lmu, correction=c, proximal_logprobs=lmu)
            for c in ("is", "none", "ppo_clip", "decoupled", "m2po", "m2po_clip")
        },
    }
    for name, value in values.items():
        assert value.dtype == torch.float32, name
        assert bool(torch.isfinite(value).all()), name
        grad = grad_of(value, z)
        assert grad.dtype == dtype, name
        assert bool(torch.isfinite(grad).all()), name
    # the untouched positions agree with a float64 computation to the input precision
    ref = forward_kl_topk(z64, ids, lt.to(F64), tail="bucket")
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(values["forward_bucket"][1].double(), ref[1], rtol=tol, atol=tol)


def test_tail_mass_zero_or_rounded_past_one_is_finite() -> None:
    """Teacher top-K probabilities that sum to ≥ 1 (wire rounding) give a zero tail, not NaN."""
    z = logits(60)
    ids = distinct_ids(61, k=V)
    lt = torch.log_softmax(logits(62).detach(), -1).gather(-1, ids) + 1e-3  # Σp ≈ 1.001
    student_ids = distinct_ids(63)
    lt_k = torch.full((*LEAD, K), math.log(1.0 / K))  # exactly Σp = 1 on K < V ids
    for value in (
        forward_kl_topk(z, ids, lt, tail="bucket"),
        reverse_kl_topk(z, ids, lt, tail="bucket"),
        forward_kl_topk(z, student_ids, lt_k.double(), tail="bucket"),
        reverse_kl_topk(z, student_ids, lt_k.double(), tail="bucket"),
    ):
        assert bool(torch.isfinite(value).all())
        assert bool(torch.isfinite(grad_of(value, z)).all())


def test_neg_inf_student_logits_are_finite() -> None:
    """Masked (−inf) student vocabulary entries: zero probability, no NaN from 0·(−inf)."""
    z = logits(70).detach().clone()
    z[..., -2:] = -math.inf
    z.requires_grad_()
    t = logits(71).detach()
    ids = torch.arange(V - K, V).expand((*LEAD, K))  # includes the masked ids
    lt = torch.log_softmax(t, -1).gather(-1, ids)
    for value in (
        reverse_kl_full(z, t),
        forward_kl_full(z, t),
        reverse_kl_topk(z, ids, lt, tail="bucket"),
        forward_kl_topk(z, ids, lt, tail="bucket"),
        reverse_kl_mc(z, ids, lt, lt),
    ):
        assert bool(torch.isfinite(value).all())
        assert bool(torch.isfinite(grad_of(value, z)).all())


def test_chunked_kernels_equal_single_chunk() -> None:
    """Chunk boundaries (one row per chunk, ragged last chunk) change nothing, value or gradient."""
    z, t = logits(80, lead=(7,)), logits(81, lead=(7,)).detach()
    ids = distinct_ids(82, lead=(7,))
    for kernel in (
        lambda c: gather_logprobs(z, ids, chunk_elements=c),
        lambda c: dense_reverse_kl(z, t, chunk_elements=c),
        lambda c: dense_forward_kl(z, t, chunk_elements=c),
    ):
        for chunk in (1, 3 * V):
            assert_value_and_grad(kernel(chunk), kernel(1 << 20), z, tol=1e-12)


def test_gather_logprobs_equals_log_softmax() -> None:
    z = logits(90)
    ids = torch.randint(0, V, (*LEAD, 9), generator=gen(91))  # with repeats, like MC samples
    assert_value_and_grad(gather_logprobs(z, ids), torch.log_softmax(z, -1).gather(-1, ids), z, tol=1e-12)


def test_shape_errors_say_what_is_wrong() -> None:
    z = logits(95)
    ids = distinct_ids(96)
    with pytest.raises(ValueError, match="teacher_logprobs shape"):
        forward_kl_topk(z, ids, torch.zeros((*LEAD, K + 1)))
    with pytest.raises(ValueError, match="leading shape"):
        reverse_kl_topk(z, ids[:1], torch.zeros((1, 3, K)))
    with pytest.raises(ValueError, match="integer"):
        reverse_kl_topk(z, ids.double(), torch.zeros((*LEAD, K)))
    with pytest.raises(ValueError, match="tail must be one of"):
        reverse_kl_topk(z, ids, torch.zeros((*LEAD, K)), tail="renorm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proximal_logprobs"):
        reverse_kl_mc(z, ids, torch.zeros((*LEAD, K)), torch.zeros((*LEAD, K)), correction="decoupled")


# ---------------------------------------------------------------- at Qwen3's vocabulary


def test_forward_kl_topk_bucket_is_the_dense_kl_at_qwen3_vocabulary() -> None:
    """The wide world's shape (docs/wide-world.md): 151,936 rows, a few dozen task ids carrying the
    mass and every other row's logit exactly 0 in both models, so the teacher's tail is
    proportional to the student's and the top-64 bucket KL *is* the dense forward KL. In fp32,
    through the chunked LM head as the learner computes it, value and gradients (hidden states
    and LM head) match the dense fp64 formula: the estimator is not why forward_kl_topk trained
    worse there."""
    rows, hidden, task, k = 151_936, 16, 40, 64
    gen = torch.Generator().manual_seed(15)
    task_ids = torch.randperm(rows, generator=gen)[:task]

    def head(scale: float) -> Tensor:
        w = torch.zeros(rows, hidden, dtype=torch.float64)
        w[task_ids] = scale * torch.randn(task, hidden, generator=gen, dtype=torch.float64)
        return w

    w_student, w_teacher = head(2.0), head(2.5)
    h = torch.randn(6, hidden, generator=gen, dtype=torch.float64)
    teacher_logp = torch.log_softmax(h @ w_teacher.T, -1)
    # K = 64 ids: the task's 40 and 24 rows at logit 0 (the rest are at logit 0 in both models)
    others = torch.ones(rows, dtype=torch.bool)
    others[task_ids] = False
    top_ids = torch.cat([task_ids, torch.nonzero(others).flatten()[: k - task]]).expand(6, k)
    top_logp = teacher_logp.gather(-1, top_ids)
    # as in the world the student leaves more mass outside the 64 ids (≥ 1e-4) than the teacher
    # (from 1e-8 to 3e-3)
    tail = 1 - top_logp.exp().sum(-1)
    student_tail = 1 - torch.log_softmax(h @ w_student.T, -1).gather(-1, top_ids).exp().sum(-1)
    assert float(tail.min()) < 1e-7 and float(tail.max()) > 1e-3 and float(student_tail.min()) > 1e-4

    h32 = h.float().requires_grad_()
    w32 = w_student.float().requires_grad_()
    got = forward_kl_topk(ProjectedLogits(h32, w32, None, 4), top_ids, top_logp.float(), tail="bucket")
    h64 = h.clone().requires_grad_()
    w64 = w_student.clone().requires_grad_()
    want = dense_forward_kl(h64 @ w64.T, h @ w_teacher.T)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    assert h32.grad is not None and w32.grad is not None and h64.grad is not None and w64.grad is not None
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-7)
    # the rows outside the task get the dense gradient too (π_v − p_v, here ∝ π_v): not zero
    assert float(w64.grad[others].abs().max()) > 0
