"""Bias, variance and direction of a stochastic gradient estimator against an exact reference.

Given R independent draws g_1..g_R of an estimator's gradient (flattened, [R, D]) and the exact
gradient g* ([D]) it estimates:

- relative bias      ‖ḡ − g*‖ / ‖g*‖                 with ḡ = (1/R) Σ_r g_r
- relative variance  (1/(R−1)) Σ_r ‖g_r − ḡ‖² / ‖g*‖²   (unbiased; 0 for R = 1)
- bias floor         sqrt(relative variance / R): the relative bias an *unbiased* estimator
                     shows from R draws alone (E‖ḡ − g*‖² = Var/R), so a measured bias near
                     it is noise, not bias
- cosine of the mean cos(ḡ, g*), and the mean cosine of single draws (1/R) Σ_r cos(g_r, g*)
  (the direction one optimizer step sees)

Pure torch on tensors; it knows nothing of models, estimators or where the draws came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GradientStats:
    """How R draws of an estimator relate to the exact gradient (all relative to ‖g*‖)."""

    draws: int
    relative_bias: float
    relative_variance: float
    bias_floor: float
    cosine_of_mean: float
    mean_cosine: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _cosine(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def gradient_stats(draws: Tensor, reference: Tensor) -> GradientStats:
    """Statistics of `draws` [R, D] against `reference` [D] (see the module docstring)."""
    if draws.ndim != 2 or reference.ndim != 1 or draws.shape[1] != reference.shape[0]:
        raise ValueError(
            f"draws must be [R, D] and reference [D]; got {tuple(draws.shape)} and {tuple(reference.shape)}"
        )
    if draws.shape[0] < 1:
        raise ValueError("need at least one draw")
    draws = draws.double()
    reference = reference.double()
    scale = float(reference.square().sum())
    if scale == 0.0:
        raise ValueError("the reference gradient is zero: relative statistics are undefined")
    r = draws.shape[0]
    mean = draws.mean(0)
    spread = float((draws - mean).square().sum()) / (r - 1) if r > 1 else 0.0
    relative_variance = spread / scale
    return GradientStats(
        draws=r,
        relative_bias=float((mean - reference).norm()) / math.sqrt(scale),
        relative_variance=relative_variance,
        bias_floor=math.sqrt(relative_variance / r),
        cosine_of_mean=_cosine(mean, reference),
        mean_cosine=sum(_cosine(g, reference) for g in draws) / r,
    )


def variance_slope(sizes: Sequence[float], variances: Sequence[float]) -> float:
    """Least-squares slope of log(variance) on log(size): −1 is the 1/N law of averaging N draws."""
    if len(sizes) != len(variances) or len(sizes) < 2:
        raise ValueError("need at least two (size, variance) pairs of equal length")
    if min(sizes) <= 0 or min(variances) <= 0:
        raise ValueError("sizes and variances must be positive to fit on a log scale")
    x = torch.tensor([math.log(s) for s in sizes], dtype=torch.float64)
    y = torch.tensor([math.log(v) for v in variances], dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / xc.square().sum())


def flat_gradient(loss: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
    """∇ loss w.r.t. `params`, concatenated into one float64 vector (zeros where unused)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads, strict=True)]
    )
