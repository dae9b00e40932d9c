"""The behaviour distribution μ and the support drawn from it, against naive formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from asyncopd.records import SupportKind
from asyncopd.rollout.sampling import Sampling, behaviour_logprobs, draw_support, sample

pytestmark = pytest.mark.unit


def naive_mu(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """μ by hand: tempered softmax, keep the most likely tokens until their mass reaches top_p."""
    z = [x / temperature for x in logits]
    m = max(z)
    w = [math.exp(v - m) for v in z]
    p = [v / sum(w) for v in w]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square test (Wilson–Hilferty approximation of the tail)."""
    n = counts.sum()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (0.5, 0.5), (1.0, 0.05)])
def test_behaviour_logprobs_match_naive_formula(temperature: float, top_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 12, generator=gen, dtype=torch.float64) * 2
    got = behaviour_logprobs(logits, Sampling(temperature=temperature, top_p=top_p)).exp()
    for row in range(logits.shape[0]):
        want = torch.tensor(naive_mu(logits[row].tolist(), temperature, top_p), dtype=torch.float32)
        torch.testing.assert_close(got[row], want, atol=1e-6, rtol=1e-5)


def test_top_p_always_keeps_the_most_likely_token_and_greedy_is_a_point_mass() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    tiny = behaviour_logprobs(logits, Sampling(top_p=1e-6))
    assert tiny[0, 1] == 0.0 and torch.isinf(tiny[0, [0, 2, 3]]).all()
    greedy = behaviour_logprobs(logits, Sampling(greedy=True))
    assert greedy[0].tolist() == [-math.inf, 0.0, -math.inf, -math.inf]


def test_student_topk_support_is_the_true_top_k_of_mu() -> None:
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(1))
    logmu = behaviour_logprobs(logits, Sampling(temperature=0.8, top_p=0.9))
    ids, lps = draw_support(logmu, torch.zeros(5, dtype=torch.long), SupportKind.STUDENT_TOPK, 6)  # type: ignore[misc]
    for row in range(5):
        want = sorted(range(20), key=lambda i: -float(logmu[row, i]))[:6]
        assert set(ids[row].tolist()) == set(want)
        torch.testing.assert_close(lps[row], logmu[row, ids[row]])
    assert draw_support(logmu, ids[:, 0], SupportKind.NONE, 3) is None


def test_mc_draws_are_distributed_as_mu_and_column_zero_is_the_token() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 10, generator=gen) * 1.5
    logmu = behaviour_logprobs(logits, Sampling(temperature=1.2, top_p=0.95))
    rows = 400
    tokens = sample(logmu.expand(rows, -1), gen)
    support = draw_support(logmu.expand(rows, -1), tokens, SupportKind.MC_SAMPLES, 8, gen)
    assert support is not None
    ids, lps = support
    assert torch.equal(ids[:, 0], tokens)
    torch.testing.assert_close(lps, logmu.expand(rows, -1).gather(-1, ids))
    probs = logmu[0].exp().double().numpy()
    draws = np.bincount(ids[:, 1:].reshape(-1).numpy(), minlength=10)
    assert draws[probs == 0].sum() == 0, "no draw outside the nucleus"
    assert chi_square_p(draws, probs) > 1e-3
    generated = np.bincount(tokens.numpy(), minlength=10)
    assert chi_square_p(generated, probs) > 1e-3


def test_support_size_must_fit_the_vocabulary() -> None:
    logmu = torch.log_softmax(torch.zeros(2, 4), -1)
    with pytest.raises(ValueError, match="support_k"):
        draw_support(logmu, torch.zeros(2, dtype=torch.long), SupportKind.STUDENT_TOPK, 5)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0.0)
