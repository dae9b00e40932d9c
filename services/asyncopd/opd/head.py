"""Logits given as hidden states and an output projection, evaluated a chunk of positions at a time.

A learner's student logits are `hidden @ weightᵀ (+ bias)`: [positions, V] with V ≈ 151k, i.e.
5 GB in fp32 at 8,192 positions, plus as much again for their gradient. `ProjectedLogits`
stands for that tensor without building it. The kernels of `asyncopd.opd.vocab` (and so every
estimator) accept it wherever they accept logits: `project_chunks` computes the logits of
`chunk_positions` positions, applies the per-position function to them and keeps only its
small output ([chunk, K] log-probs, [chunk] KLs). Backward recomputes each chunk's logits,
backpropagates the function through them and accumulates the gradients of the hidden states,
the weight and the bias chunk by chunk, so the largest temporaries are a few [chunk, V] blocks.
The cost is one more [positions, H] x [H, V] matmul (the recomputation).

The per-position function must treat positions independently (row c of its output depends
only on row c of its inputs): every estimator kernel does; reductions over positions (token
means, M2PO's global mask) happen after it, on its small output, exactly as with a tensor.

This module knows matmuls, dtypes and autograd; it knows nothing of estimators or models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_POSITIONS = 1024
"""Positions per chunk unless the caller says otherwise: [1024, 151,936] fp32 is 594 MiB."""


@dataclass(frozen=True)
class ProjectedLogits:
    """Logits [..., V] = hidden [..., H] @ weight[V, H]ᵀ (+ bias [V]), never materialised whole.

    `matmul_dtype` is the dtype of the projection (the logits' dtype): bfloat16 under mixed
    precision with fp32 master weights (as autocast would run the LM head), None = the hidden
    states' dtype. Gradients flow to `hidden`, `weight` and `bias` as far as they require them.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    chunk_positions: int = DEFAULT_CHUNK_POSITIONS
    matmul_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions must be >= 1, got {self.chunk_positions}")
        if self.weight.dim() != 2 or self.hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"hidden [..., {self.hidden.shape[-1]}] does not match weight {tuple(self.weight.shape)} "
                "(expected weight [V, H])"
            )
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"bias shape {tuple(self.bias.shape)} != ({self.weight.shape[0]},)")

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: [..., V]."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the logits would have."""
        return self.matmul_dtype or self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def materialize(self) -> Tensor:
        """The whole [..., V] tensor (for tests and references; defeats the purpose otherwise)."""
        return _project(self.hidden, self.weight, self.bias, self.dtype)

    def chunk(self, start: int, stop: int) -> ProjectedLogits:
        """Positions start:stop of the flattened leading dimensions, as [stop - start, V]."""
        flat = self.hidden.reshape(-1, self.hidden.shape[-1])
        return ProjectedLogits(flat[start:stop], self.weight, self.bias, self.chunk_positions, self.matmul_dtype)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """hidden @ weightᵀ + bias in `dtype`, whatever autocast says (the caller chose the dtype)."""
    with torch.autocast(hidden.device.type, enabled=False):
        out = hidden.to(dtype) @ weight.to(dtype).t()
        return out if bias is None else out + bias.to(dtype)


ChunkFn = Callable[..., Tensor]
"""fn(logits [c, V], *per-position arguments [c, ...]) -> [c, ...]."""


class _ProjectChunks(torch.autograd.Function):
    """fn(hidden @ Wᵀ + b, *args) over chunks of rows; backward recomputes each chunk."""

    @staticmethod
    def forward(  # type: ignore[override]  # noqa: PLR0917 - autograd passes inputs positionally
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        fn: ChunkFn,
        rows: int,
        dtype: torch.dtype,
        *args: Tensor,
    ) -> Tensor:
        parts = []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], rows):
                z = _project(hidden[start : start + rows], weight, bias, dtype)
                parts.append(fn(z, *(a[start : start + rows] for a in args)))
                del z
        ctx.save_for_backward(hidden, weight, bias, *args)
        ctx.fn, ctx.rows, ctx.dtype = fn, rows, dtype
        return torch.cat(parts) if parts else hidden.new_zeros((0,))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, *args = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # accumulate in fp32 at least, whatever the matmul dtype; cast to the weight's dtype at the end
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias and bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.rows):
                stop = start + ctx.rows
                h = hidden[start:stop].to(dtype)
                with torch.enable_grad():
                    z = _project(h, w, bias, dtype).detach().requires_grad_()
                    out = ctx.fn(z, *(a[start:stop] for a in args))
                    (gz,) = torch.autograd.grad(out, z, grad_out[start:stop].to(out.dtype))
                del z, out
                if grad_hidden is not None:
                    grad_hidden[start:stop] = gz @ w
                if grad_weight is not None:
                    if gz.dtype == acc:
                        grad_weight.addmm_(gz.t(), h)
                    else:
                        grad_weight.add_(gz.t() @ h)
                if grad_bias is not None:
                    grad_bias.add_(gz.sum(0, dtype=acc))
                del gz
        gw = None if grad_weight is None else grad_weight.to(weight.dtype)
        gb = None if grad_bias is None or bias is None else grad_bias.to(bias.dtype)
        return (grad_hidden, gw, gb, None, None, None, *(None for _ in args))


def project_chunks(fn: ChunkFn, logits: ProjectedLogits, *args: Tensor) -> Tensor:
    """fn(logits, *args) for a position-wise `fn`, one chunk of positions at a time.

    logits [..., V] (projected); each of `args` [..., *] with the same leading shape (sliced
    with the positions; no gradient flows to them) -> fn's output, leading shape restored.
    """
    lead = logits.hidden.shape[:-1]
    positions = lead.numel()
    flat_args = []
    for a in args:
        if a.shape[: len(lead)] != lead:
            raise ValueError(
                f"argument leading shape {tuple(a.shape[: len(lead)])} != logits leading shape {tuple(lead)}"
            )
        flat_args.append(a.detach().reshape(positions, *a.shape[len(lead) :]))
    hidden = logits.hidden.reshape(positions, logits.hidden.shape[-1])
    out: Tensor = _ProjectChunks.apply(
        hidden, logits.weight, logits.bias, fn, logits.chunk_positions, logits.dtype, *flat_args
    )
    return out.reshape(*lead, *out.shape[1:])
