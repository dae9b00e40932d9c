"""Floating-point care shared by every estimator: compute dtype, -inf handling, log(1 - e^a).

This module knows about dtypes and the edge values log-probabilities take (-inf for a token a
model gives zero probability, sums that round past 1). It knows nothing about KL estimators.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGPROB_FLOOR = -1.0e4
"""Every log-probability is clamped from below at this value before it enters a product.

-inf (zero probability: a token outside the teacher's support, a tail of mass 0, a masked
vocabulary entry) would otherwise give 0·(-inf) = NaN or an infinite loss. exp(-1e4) underflows
to exactly 0 in fp32 and fp64, so the clamp changes no probability; it only turns log-ratios
that are infinite in exact arithmetic into large finite penalties. Finite log-probs that
models produce in practice (> -1e3) are untouched.
"""

_LN2 = math.log(2.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimators compute in: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def floor_logprobs(logprobs: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to `dtype` and clamp at `LOGPROB_FLOOR` (-inf becomes finite; gradient 0 below it)."""
    return logprobs.to(dtype).clamp(min=LOGPROB_FLOOR)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a log-mass `a` <= 0, i.e. the log of the mass outside a set.

    Accurate on both sides of -ln 2 (expm1 near 0, log1p far from 0; Mächler 2012). When `a`
    rounds to >= 0 (the set's probabilities sum to 1 or more in floating point) the complement
    has no mass: the result is log(smallest normal), a finite stand-in for log 0. Each branch
    gets an input clamped to its own safe range so that neither produces inf/NaN in backward.
    """
    tiny = torch.finfo(a.dtype).tiny
    a = a.clamp(max=-tiny)
    near_zero = torch.log(-torch.expm1(a.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(a.clamp(max=-_LN2)))
    return torch.where(a > -_LN2, near_zero, far)


def rows_per_chunk(vocab_size: int, chunk_elements: int) -> int:
    """How many positions of a [positions, V] block fit in `chunk_elements` elements (>= 1)."""
    return max(1, chunk_elements // max(1, vocab_size))
