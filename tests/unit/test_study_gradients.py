"""The study's math and its staleness bookkeeping.

- `gradient_stats` against a naive per-draw loop;
- the probe's draws on a linear-softmax model whose dense reverse-KL gradient is written by hand:
  the sparse estimator with K = |V| is exact, MC (recompute + is) is unbiased and its variance
  falls ~1/N;
- the harness's staleness: step t's rollouts come from version max(0, t − s), read back from the
  versions the engine stamped on them (fails on any off-by-one), and reruns are identical.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from asyncopd.lab.study.gradients import flat_gradient, gradient_stats, variance_slope
from asyncopd.lab.study.harness import SnapshotRing, behaviour_version
from asyncopd.lab.study.probe import draw_gradients
from asyncopd.opd import LossInputs, OPDLoss
from asyncopd.records import SupportKind

pytestmark = pytest.mark.unit


def _naive_stats(draws: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    r = draws.shape[0]
    mean = [sum(draws[i][j] for i in range(r)) / r for j in range(draws.shape[1])]
    ref_sq = sum(x * x for x in ref)
    bias = math.sqrt(sum((m - x) ** 2 for m, x in zip(mean, ref, strict=True)) / ref_sq)
    var = sum(sum((draws[i][j] - mean[j]) ** 2 for j in range(len(mean))) for i in range(r)) / (r - 1) / ref_sq

    def cos(a: list[float] | np.ndarray, b: np.ndarray) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    return {
        "relative_bias": bias,
        "relative_variance": var,
        "bias_floor": math.sqrt(var / r),
        "cosine_of_mean": cos(mean, ref),
        "mean_cosine": sum(cos(draws[i], ref) for i in range(r)) / r,
    }


def test_gradient_stats_match_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=7)
    draws = ref + 0.3 + rng.normal(size=(9, 7))
    got = gradient_stats(torch.from_numpy(draws), torch.from_numpy(ref)).as_dict()
    want = _naive_stats(draws, ref)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9), name
    assert got["draws"] == 9


def test_gradient_stats_of_one_exact_draw_are_zero_bias_zero_variance() -> None:
    ref = torch.tensor([1.0, -2.0, 0.5])
    stats = gradient_stats(ref[None], ref)
    assert stats.relative_bias == 0.0 and stats.relative_variance == 0.0
    assert stats.cosine_of_mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        gradient_stats(ref[None], torch.zeros(3))


def test_variance_slope_recovers_a_power_law() -> None:
    assert variance_slope([1, 4, 16], [8.0, 2.0, 0.5]) == pytest.approx(-1.0)
    assert variance_slope([1, 2, 4], [1.0, 0.25, 0.0625]) == pytest.approx(-2.0)


# -- a linear-softmax "model": logits z_i = W x_i; the teacher a fixed distribution per position


class LinearSoftmax:
    def __init__(self, positions: int = 6, vocab: int = 5, features: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(positions, features, generator=g, dtype=torch.float64)
        self.w = torch.randn(vocab, features, generator=g, dtype=torch.float64, requires_grad=True)
        self.teacher_logp = torch.log_softmax(torch.randn(positions, vocab, generator=g, dtype=torch.float64), -1)
        self.valid = torch.ones(positions, dtype=torch.bool)

    def logits(self) -> torch.Tensor:
        return self.x @ self.w.T

    def hand_gradient(self) -> torch.Tensor:
        """∇_W of the token-mean reverse KL: dKL/dz = π ⊙ (log π − log p − KL), dW = mean_i dz_i ⊗ x_i."""
        with torch.no_grad():
            logp = torch.log_softmax(self.logits(), -1)
            pi = logp.exp()
            kl = (pi * (logp - self.teacher_logp)).sum(-1, keepdim=True)
            dz = pi * (logp - self.teacher_logp - kl)
            return (dz.T @ self.x / self.x.shape[0]).reshape(-1)

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher_logp.gather(-1, ids)

    def gradient_of(
        self, loss: OPDLoss, ids: torch.Tensor, teacher: torch.Tensor, behaviour: torch.Tensor
    ) -> torch.Tensor:
        inputs = LossInputs(self.logits(), self.valid, ids=ids, teacher_logprobs=teacher, behavior_logprobs=behaviour)
        return flat_gradient(loss(inputs).loss, [self.w])

    def draws(self, loss: OPDLoss, kind: SupportKind, k: int, draws: int, seed: int = 1) -> torch.Tensor:
        logmu = torch.log_softmax(self.logits().detach(), -1).float()
        generator = torch.Generator().manual_seed(seed)
        return draw_gradients(
            loss, self.gradient_of, logmu, kind=kind, k=k, draws=draws, score=self.score, generator=generator
        )


def test_dense_reverse_kl_gradient_matches_the_hand_formula() -> None:
    model = LinearSoftmax()
    teacher_logits = model.teacher_logp  # log-probs are valid logits
    loss = OPDLoss("reverse_kl_full")(LossInputs(model.logits(), model.valid, teacher_logits=teacher_logits)).loss
    torch.testing.assert_close(flat_gradient(loss, [model.w]), model.hand_gradient())


def test_sparse_reverse_kl_with_the_full_vocabulary_is_exact() -> None:
    model = LinearSoftmax()
    grads = model.draws(OPDLoss("reverse_kl_topk", tail="bucket"), SupportKind.STUDENT_TOPK, 5, draws=10)
    assert grads.shape[0] == 1  # deterministic support: one draw
    stats = gradient_stats(grads, model.hand_gradient())
    assert stats.relative_bias < 1e-5
    # a smaller support drops mass: biased
    sparse = gradient_stats(
        model.draws(OPDLoss("reverse_kl_topk", tail="bucket"), SupportKind.STUDENT_TOPK, 2, draws=1),
        model.hand_gradient(),
    )
    assert sparse.relative_bias > 1e-3


def test_mc_recompute_is_is_unbiased_and_its_variance_falls_like_one_over_n() -> None:
    model = LinearSoftmax()
    exact = model.hand_gradient()
    loss = OPDLoss("reverse_kl_mc", advantage="recompute", correction="is")
    variances = []
    sizes = [1, 4, 16]
    for n in sizes:
        stats = gradient_stats(model.draws(loss, SupportKind.MC_SAMPLES, n, draws=600, seed=n), exact)
        # unbiased: the measured bias is what R draws of noise leave, not more
        assert stats.relative_bias < 3 * stats.bias_floor + 1e-3, (n, stats)
        variances.append(stats.relative_variance)
    assert -1.25 < variance_slope(sizes, variances) < -0.75, variances
    for a, b in itertools.pairwise(variances):
        assert 2.5 < a / b < 6.0, variances


def test_mc_with_the_stale_rollout_signal_is_biased() -> None:
    """The estimator under test can fail: with μ ≠ π_θ the rollout-time advantage misses ∇KL."""
    model = LinearSoftmax()
    exact = model.hand_gradient()
    stale = torch.log_softmax(model.logits().detach() + torch.randn(6, 5, dtype=torch.float64), -1).float()
    loss = OPDLoss("reverse_kl_mc", advantage="rollout", correction="is")
    generator = torch.Generator().manual_seed(3)
    grads = draw_gradients(
        loss,
        model.gradient_of,
        stale,
        kind=SupportKind.MC_SAMPLES,
        k=16,
        draws=300,
        score=model.score,
        generator=generator,
    )
    stats = gradient_stats(grads, exact)
    assert stats.relative_bias > 3 * stats.bias_floor


def test_probe_draws_more_mc_samples_than_the_vocabulary_in_chunks() -> None:
    model = LinearSoftmax(vocab=5)
    grads = model.draws(OPDLoss("reverse_kl_mc"), SupportKind.MC_SAMPLES, 12, draws=3)
    assert grads.shape == (3, 15)


# -- staleness bookkeeping


@pytest.mark.parametrize("staleness", [0, 1, 2, 4])
def test_behaviour_version_is_t_minus_s_floored_at_zero(staleness: int) -> None:
    assert [behaviour_version(t, staleness) for t in range(7)] == [max(0, t - staleness) for t in range(7)]
    assert behaviour_version(staleness + 3, staleness) == 3


def test_snapshot_ring_serves_version_t_minus_s_and_forgets_older_ones() -> None:
    ring = SnapshotRing(2)
    served = []
    for t in range(6):
        if t == 0:
            ring.push(0, [("w", torch.tensor([0.0]))])
        version, weights = ring.for_step(t)
        served.append((version, float(weights[0][1])))
        ring.push(t + 1, [("w", torch.tensor([float(t + 1)]))])
        assert ring.versions() == list(range(max(0, t + 1 - 2), t + 2))
    assert served == [(0, 0.0), (0, 0.0), (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    with pytest.raises(ValueError, match="increase"):
        ring.push(3, [])


def test_snapshot_ring_copies_the_weights() -> None:
    ring = SnapshotRing(1)
    w = torch.tensor([1.0])
    ring.push(0, [("w", w)])
    w.add_(5.0)
    assert float(ring.for_step(0)[1][0][1]) == 1.0


def test_harness_generates_step_t_with_version_t_minus_s_and_reruns_identically() -> None:
    from asyncopd.config import load_config
    from asyncopd.lab.study.harness import StalenessHarness, load_study_models

    torch.set_num_threads(1)
    config = load_config(
        "configs/toy.yaml",
        ["learner.batch_size=4", "rollout.sampling.max_tokens=8", "learner.warmup_steps=0", "seed=5"],
    )
    shared = load_study_models(config, test_size=4)
    first = StalenessHarness(config, 2, shared).run(5, evaluate_at_end=False)
    assert first.learner_versions == [0, 1, 2, 3, 4]
    assert first.behaviour_versions == [0, 0, 0, 1, 2]
    again = StalenessHarness(config, 2, shared).run(5, evaluate_at_end=False)
    assert again.kl == first.kl
    synchronous = StalenessHarness(config, 0, shared).run(3, evaluate_at_end=False)
    assert synchronous.behaviour_versions == [0, 1, 2]
