"""Properties of the Monte-Carlo reverse-KL estimator and its corrections (docs/opd-math.md).

Unbiasedness is checked twice: exactly, with a behaviour policy of rational probabilities whose
"samples" hold every token in proportion to μ (the sample mean *is* the expectation), and
statistically, with draws from fixed-seed generators and tolerances of 5 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from asyncopd.opd import m2po_mask, reverse_kl_full, reverse_kl_mc, reverse_kl_mc_terms
from torch import Tensor

pytestmark = pytest.mark.unit

F64 = torch.float64
COUNTS = torch.tensor([1, 2, 3, 4, 5, 5])  # μ = COUNTS / 20, a behaviour policy ≠ π
V = int(COUNTS.numel())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grad_of(value: Tensor, wrt: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value.sum(), wrt, retain_graph=True)
    return grad


def exact_expectation_inputs(student: Tensor) -> dict[str, Tensor]:
    """Teacher and μ-proportional "samples" for one position of a V-token vocabulary."""
    teacher = torch.randn(V, generator=gen(1), dtype=F64) * 2
    ids = torch.repeat_interleave(torch.arange(V), COUNTS)
    log_mu = torch.log(COUNTS.to(F64) / COUNTS.sum())
    return {
        "z": student,
        "t": teacher,
        "ids": ids,
        "lt": torch.log_softmax(teacher, -1)[ids],
        "lmu": log_mu[ids],
        "log_mu": log_mu,
    }


def student(seed: int = 0, vocab: int = V) -> Tensor:
    return (torch.randn(vocab, generator=gen(seed), dtype=F64) * 1.5).requires_grad_()


def test_recompute_is_is_exactly_unbiased() -> None:
    x = exact_expectation_inputs(student())
    mc = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], advantage="recompute", correction="is")
    exact = reverse_kl_full(x["z"], x["t"])
    torch.testing.assert_close(grad_of(mc, x["z"]), grad_of(exact, x["z"]), rtol=1e-10, atol=1e-12)


def test_rollout_is_targets_the_stale_objective() -> None:
    x = exact_expectation_inputs(student())
    mc = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], advantage="rollout", correction="is")
    pi = torch.softmax(x["z"], -1)
    stale = (pi * (x["log_mu"] - torch.log_softmax(x["t"], -1))).sum()
    grad = grad_of(mc, x["z"])
    torch.testing.assert_close(grad, grad_of(stale, x["z"]), rtol=1e-10, atol=1e-12)
    exact = grad_of(reverse_kl_full(x["z"], x["t"]), x["z"])
    assert float((grad - exact).abs().max()) > 0.05


def test_rollout_equals_recompute_and_exact_when_synchronous() -> None:
    x = exact_expectation_inputs(torch.log(COUNTS.to(F64) / COUNTS.sum()).requires_grad_())  # π = μ
    exact = grad_of(reverse_kl_full(x["z"], x["t"]), x["z"])
    for advantage in ("rollout", "recompute"):
        mc = reverse_kl_mc(x["z"], x["ids"], x["lt"], x["lmu"], advantage=advantage)  # type: ignore[arg-type]
        torch.testing.assert_close(grad_of(mc, x["z"]), exact, rtol=1e-10, atol=1e-12)


def per_sample_gradients(z: Tensor, teacher: Tensor, mu_logits: Tensor, ids: Tensor, advantage: str) -> Tensor:
    """Rows of ids [R, n] -> [R, V]: the gradient of the n-sample estimator for each row."""
    rows = z.detach().expand(ids.shape[0], -1).clone().requires_grad_()
    lt = torch.log_softmax(teacher, -1)[ids]
    lmu = torch.log_softmax(mu_logits, -1)[ids]
    return grad_of(reverse_kl_mc(rows, ids, lt, lmu, advantage=advantage), rows)  # type: ignore[arg-type]


def sampled_setup(draws: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    vocab = 8
    z = student(2, vocab)
    teacher = torch.randn(vocab, generator=gen(3), dtype=F64) * 2
    mu_logits = z.detach() + torch.randn(vocab, generator=gen(4), dtype=F64)
    ids = torch.multinomial(torch.softmax(mu_logits, -1), draws, replacement=True, generator=gen(5))
    return z, teacher, mu_logits, ids


def test_sampled_recompute_gradient_matches_exact_and_rollout_does_not() -> None:
    draws = 40_000
    z, teacher, mu_logits, ids = sampled_setup(draws)
    exact = grad_of(reverse_kl_full(z, teacher), z)
    pi = torch.softmax(z, -1)
    stale = grad_of((pi * (torch.log_softmax(mu_logits, -1) - torch.log_softmax(teacher, -1))).sum(), z)

    recompute = per_sample_gradients(z, teacher, mu_logits, ids[:, None], "recompute")
    se = recompute.std(0) / math.sqrt(draws)
    assert bool(((recompute.mean(0) - exact).abs() <= 5 * se).all())

    rollout = per_sample_gradients(z, teacher, mu_logits, ids[:, None], "rollout")
    se = rollout.std(0) / math.sqrt(draws)
    assert bool(((rollout.mean(0) - stale).abs() <= 5 * se).all())
    assert bool(((rollout.mean(0) - exact).abs() > 5 * se).any())


def test_variance_falls_as_one_over_n() -> None:
    draws, n = 32_000, 16
    z, teacher, mu_logits, ids = sampled_setup(draws)
    single = per_sample_gradients(z, teacher, mu_logits, ids[:, None], "recompute")
    multi = per_sample_gradients(z, teacher, mu_logits, ids.reshape(-1, n), "recompute")
    ratio = float(multi.var(0).sum() / (single.var(0).sum() / n))
    assert 0.85 < ratio < 1.15


def test_n_samples_is_the_mean_of_single_sample_estimators() -> None:
    z, teacher, mu_logits, ids = sampled_setup(7)
    lt = torch.log_softmax(teacher, -1)[ids]
    lmu = torch.log_softmax(mu_logits, -1)[ids]
    multi = reverse_kl_mc(z, ids, lt, lmu)
    singles = torch.stack([reverse_kl_mc(z, ids[j : j + 1], lt[j : j + 1], lmu[j : j + 1]) for j in range(7)])
    torch.testing.assert_close(multi, singles.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(multi, z), grad_of(singles.mean(), z), rtol=1e-12, atol=1e-12)
    # N = 1 is the single-token policy-gradient loss −(π/μ)(y)·sg(log p(y) − log π(y))
    log_pi = torch.log_softmax(z, -1)[ids[0]]
    by_hand = -torch.exp(log_pi - lmu[0]) * (lt[0] - log_pi.detach())
    torch.testing.assert_close(singles[0], by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(singles[0], z), grad_of(by_hand, z), rtol=1e-12, atol=1e-12)


def test_decoupled_with_proximal_equal_behaviour_is_ppo_clip() -> None:
    z, teacher, mu_logits, ids = sampled_setup(64)
    mu_logits = z.detach() + 0.8 * torch.randn(z.shape, generator=gen(9), dtype=F64)
    lt = torch.log_softmax(teacher, -1)[ids]
    lmu = torch.log_softmax(mu_logits, -1)[ids]
    for advantage in ("recompute", "rollout"):
        ppo = reverse_kl_mc_terms(z, ids, lt, lmu, advantage=advantage, correction="ppo_clip")  # type: ignore[arg-type]
        dec = reverse_kl_mc_terms(
            z,
            ids,
            lt,
            lmu,
            advantage=advantage,  # type: ignore[arg-type]
            correction="decoupled",
            proximal_logprobs=lmu,
        )
        assert 0 < int(ppo.clipped.sum()) < 64
        assert torch.equal(ppo.clipped, dec.clipped)
        torch.testing.assert_close(dec.surrogate, ppo.surrogate, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_of(dec.surrogate, z), grad_of(ppo.surrogate, z), rtol=1e-12, atol=1e-12)


RATIOS = (0.5, 0.9, 1.0, 1.1, 1.5)
ADVANTAGES = (-1.0, 1.0)


def ratio_grid(eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One position per (r, A) pair, one sample (token 0) each, built to hit those exact values."""
    cases = [(r, a) for r in RATIOS for a in ADVANTAGES]
    z = torch.randn(V, generator=gen(11), dtype=F64).expand(len(cases), V).clone().requires_grad_()
    ids = torch.zeros((len(cases), 1), dtype=torch.long)
    log_pi = torch.log_softmax(z.detach(), -1)[:, :1]
    r = torch.tensor([c[0] for c in cases], dtype=F64)[:, None]
    a = torch.tensor([c[1] for c in cases], dtype=F64)[:, None]
    lmu = log_pi - torch.log(r)
    lt = log_pi + a  # recompute advantage A = log p − log π = a
    expect_clipped = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    return z, ids, lt, lmu, expect_clipped[:, 0]


def test_ppo_clip_zero_gradient_exactly_where_clipped() -> None:
    eps = 0.2
    z, ids, lt, lmu, expect_clipped = ratio_grid(eps)
    terms = reverse_kl_mc_terms(z, ids, lt, lmu, correction="ppo_clip", clip_eps=eps)
    assert torch.equal(terms.clipped[:, 0], expect_clipped)
    assert int(expect_clipped.sum()) == 2  # (r=1.5, A=+1) and (r=0.5, A=−1)
    row_grad_norm = grad_of(terms.surrogate, z).abs().sum(-1)
    assert bool((row_grad_norm[expect_clipped] == 0).all())
    assert bool((row_grad_norm[~expect_clipped] > 1e-3).all())
    # the value is PPO's max(−rA, −clip(r)A) everywhere
    r, a = torch.exp(torch.log_softmax(z.detach(), -1)[:, :1] - lmu), lt - torch.log_softmax(z.detach(), -1)[:, :1]
    ppo = torch.maximum(-r * a, -r.clamp(1 - eps, 1 + eps) * a)
    torch.testing.assert_close(terms.surrogate, ppo, rtol=1e-12, atol=1e-12)


def test_decoupled_zeroes_samples_over_the_behaviour_cap() -> None:
    z, ids, lt, lmu, _ = ratio_grid(0.2)
    lprox = lmu.clone()
    lprox[:4] = lmu[:4] + math.log(6.0)  # π_prox/μ = 6 > cap 5 on the first four positions
    terms = reverse_kl_mc_terms(z, ids, lt, lmu, correction="decoupled", proximal_logprobs=lprox)
    assert torch.equal(terms.kept[:, 0], torch.arange(len(z)) >= 4)
    row_grad_norm = grad_of(terms.surrogate, z).abs().sum(-1)
    assert bool((row_grad_norm[:4] == 0).all())
    assert bool((terms.surrogate[:4] == 0).all())


# ---------------------------------------------------------------- M2PO mask


def brute_force_m2po(m: list[float], tau: float) -> set[int]:
    """Indices kept: mask the n largest for the smallest n whose kept mean is below tau (keep ≥ 1)."""
    order = sorted(range(len(m)), key=lambda i: -m[i])
    for n in range(len(m)):
        kept = order[n:]
        if sum(m[i] for i in kept) / len(kept) < tau:
            return set(kept)
    return {order[-1]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_m2po_mask_matches_brute_force(seed: int) -> None:
    log_ratio = torch.randn((4, 5, 3), generator=gen(seed)) * 0.3
    valid = torch.rand((4, 5, 3), generator=gen(seed + 10)) > 0.2
    tau = 0.04
    kept = m2po_mask(log_ratio, valid, tau)
    flat_ids = torch.nonzero(valid.flatten())[:, 0].tolist()
    m = [float(log_ratio.flatten()[i]) ** 2 for i in flat_ids]
    expected = {flat_ids[i] for i in brute_force_m2po(m, tau)}
    assert set(torch.nonzero(kept.flatten())[:, 0].tolist()) == expected
    assert 0 < len(expected) < len(flat_ids)  # this seed masks some but not all
    kept_m = log_ratio[kept].square()
    assert float(kept_m.mean()) < tau
    # fewest: bringing back the smallest masked token pushes the mean to ≥ tau
    masked_m = log_ratio[valid & ~kept].square()
    assert float(torch.cat([kept_m, masked_m.min()[None]]).mean()) >= tau


def test_m2po_masks_nothing_when_already_below_tau() -> None:
    log_ratio = torch.full((3, 4), 0.1)  # M = 0.01 everywhere, mean 0.01 < 0.04
    log_ratio[0, 0] = 0.3  # one token above tau, mean still below
    assert bool(m2po_mask(log_ratio, None, 0.04).all())
    assert bool(m2po_mask(torch.zeros(5), None, 0.04).all())


def test_m2po_never_masks_everything() -> None:
    log_ratio = torch.tensor([3.0, -1.0, 2.0, 5.0])  # every M ≥ 1 ≫ tau
    kept = m2po_mask(log_ratio, None, 0.04)
    assert kept.tolist() == [False, True, False, False]


def test_m2po_ignores_invalid_tokens() -> None:
    log_ratio = torch.tensor([0.1, 0.1, 10.0, 0.1])
    valid = torch.tensor([True, True, False, True])
    assert m2po_mask(log_ratio, valid, 0.04).tolist() == [True, True, False, True]
    assert not bool(m2po_mask(log_ratio, torch.zeros(4, dtype=torch.bool), 0.04).any())
