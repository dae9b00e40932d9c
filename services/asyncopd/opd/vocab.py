"""Full-vocabulary kernels that never hold a whole [positions, V] log-softmax in memory.

For V ≈ 151k a [2048, V] fp32 block is 1.2 GB, and plain autograd through `log_softmax` keeps
several such blocks alive (the log-softmax, its exp, products) until backward. These kernels
walk the positions in chunks, keep only the inputs and one number per position for backward,
and recompute the chunk's softmax there, so the only full-size allocation is the gradient
itself. They know how to turn logits into log-probabilities and dense KLs; they know nothing
about estimators, tails, samples or corrections.

Inputs are flattened to [positions, V]; outputs come back with the leading shape restored.
Teacher logits are targets: they never receive a gradient. Wherever logits are taken, a
`ProjectedLogits` (hidden states and an LM head, `asyncopd.opd.head`) may stand for them: the
kernel then runs on one chunk of projected positions at a time and no [positions, V] tensor
exists at all, not even the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from asyncopd.opd.head import ProjectedLogits, project_chunks
from asyncopd.opd.numerics import LOGPROB_FLOOR, compute_dtype, rows_per_chunk

Logits = Tensor | ProjectedLogits
"""Logits [..., V]: a tensor, or hidden states with the output projection that gives them."""

CPU_CHUNK_ELEMENTS = 1 << 19
"""Elements per temporary block on CPU (512 Ki: 2 MB in fp32, 3 rows of a 151k vocabulary).

Measured on CPU at V = 151,669: CPU time is flat from 2 MB to 32 MB blocks, but peak RSS is
not: glibc serves blocks of a few MB from its heap, fragments it, and with 32 MB blocks a
dense KL's forward + backward peaked at 3.4x the size of the gradient; with 2 MB blocks at
1.05x. Small blocks also stay in cache between the ops on one chunk."""

ACCELERATOR_CHUNK_ELEMENTS = 1 << 24
"""Elements per temporary block on an accelerator (16 Mi: 64 MB in fp32, 110 rows at V = 151k).

Each chunk costs a handful of kernel launches, so GPU chunks must be large enough to fill the
device. Measured on an H200 (fp32, 2048 x 151,669, forward + backward, peak allocated):
gather_logprobs 124 / 18 / 6.7 / 5.6 ms at 2 Mi / 4 Mi / 16 Mi / 64 Mi elements, all at the
gradient's 1185 MiB; dense reverse KL 184 / 29 / 19 / 16 ms at 1194 / 1265 / 1505 / 2465 MiB.
16 Mi keeps most of the speed for a quarter of the gradient's size in temporaries."""


def default_chunk_elements(tensor: Tensor) -> int:
    """The chunk size for kernels over `tensor`'s device."""
    return CPU_CHUNK_ELEMENTS if tensor.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


class _GatherLogProbs(torch.autograd.Function):
    """log softmax(z)[ids] for z [P, V], ids [P, K]; backward: g_ids - softmax(z) Σ g."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, rows: int) -> Tensor:
        cdt = compute_dtype(logits.dtype)
        positions = logits.shape[0]
        out = logits.new_empty((positions, ids.shape[1]), dtype=cdt)
        lse = logits.new_empty((positions,), dtype=cdt)
        for start in range(0, positions, rows):
            z = logits[start : start + rows].to(cdt)
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[start : start + rows] = chunk_lse
            out[start : start + rows] = z.gather(-1, ids[start : start + rows]) - chunk_lse.unsqueeze(-1)
        ctx.save_for_backward(logits, ids, lse)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, ids, lse = ctx.saved_tensors
        cdt = lse.dtype
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            g = grad_out[start:stop].to(cdt)
            chunk = _scratch(grad, start, stop, cdt)
            torch.sub(logits[start:stop].to(cdt), lse[start:stop].unsqueeze(-1), out=chunk).exp_()
            chunk.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids[start:stop], g)
            if chunk.data_ptr() != grad[start:stop].data_ptr():
                grad[start:stop] = chunk
        return grad, None, None


class _DenseReverseKL(torch.autograd.Function):
    """KL(π‖p) per row from student and teacher logits; ∂/∂z_i = π_i (d_i − KL), d = log π − log p."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, rows: int) -> Tensor:
        cdt = compute_dtype(student.dtype)
        kl = student.new_empty((student.shape[0],), dtype=cdt)
        for start in range(0, student.shape[0], rows):
            log_pi, log_p = _chunk_logprobs(student, teacher, start, rows, cdt)
            diff = log_pi.clamp(min=LOGPROB_FLOOR).sub_(log_p)
            kl[start : start + rows] = (log_pi.exp_().mul_(diff)).sum(-1)
        ctx.save_for_backward(student, teacher, kl)
        ctx.rows = rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        student, teacher, kl = ctx.saved_tensors
        cdt = kl.dtype
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.rows):
            stop = start + ctx.rows
            log_pi, log_p = _chunk_logprobs(student, teacher, start, ctx.rows, cdt)
            d = log_pi.clamp(min=LOGPROB_FLOOR).sub_(log_p).sub_(kl[start:stop].unsqueeze(-1))
            g = grad_out[start:stop].to(cdt).unsqueeze(-1)
            grad[start:stop] = log_pi.exp_().mul_(d).mul_(g)
        return grad, None, None


class _DenseForwardKL(torch.autograd.Function):
    """KL(p‖π) per row from student and teacher logits; ∂/∂z = π − p."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, rows: int) -> Tensor:
        cdt = compute_dtype(student.dtype)
        kl = student.new_empty((student.shape[0],), dtype=cdt)
        for start in range(0, student.shape[0], rows):
            log_pi, log_p = _chunk_logprobs(student, teacher, start, rows, cdt)
            diff = log_p - log_pi.clamp_(min=LOGPROB_FLOOR)
            kl[start : start + rows] = (log_p.exp_().mul_(diff)).sum(-1)
        ctx.save_for_backward(student, teacher)
        ctx.rows = rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        student, teacher = ctx.saved_tensors
        cdt = compute_dtype(student.dtype)
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.rows):
            stop = start + ctx.rows
            log_pi, log_p = _chunk_logprobs(student, teacher, start, ctx.rows, cdt)
            g = grad_out[start:stop].to(cdt).unsqueeze(-1)
            grad[start:stop] = log_pi.exp_().sub_(log_p.exp_()).mul_(g)
        return grad, None, None


def _scratch(grad: Tensor, start: int, stop: int, cdt: torch.dtype) -> Tensor:
    """Where to compute a chunk of the gradient: in place in `grad` when it already has the
    compute dtype (saves a chunk-sized temporary and a copy), else a fresh fp32 block."""
    if grad.dtype == cdt:
        return grad[start:stop]
    return grad.new_empty(grad[start:stop].shape, dtype=cdt)


def _chunk_logprobs(student: Tensor, teacher: Tensor, start: int, rows: int, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Student log-softmax (raw) and teacher log-softmax (floored) of one chunk of rows, in `cdt`."""
    log_pi = torch.log_softmax(student[start : start + rows].to(cdt), dim=-1)
    log_p = torch.log_softmax(teacher[start : start + rows].to(cdt), dim=-1).clamp_(min=LOGPROB_FLOOR)
    return log_pi, log_p


def _rows(logits: Tensor, chunk_elements: int | None) -> int:
    return rows_per_chunk(logits.shape[-1], chunk_elements or default_chunk_elements(logits))


def gather_logprobs(logits: Logits, ids: Tensor, *, chunk_elements: int | None = None) -> Tensor:
    """log softmax(logits)[ids]: logits [..., V], ids [..., K] (any integer dtype) -> [..., K].

    Returned in the compute dtype (fp32 for fp32/bf16/fp16 logits). Differentiable w.r.t.
    `logits`; ids may repeat (gradients of repeated ids add up).
    """
    if isinstance(logits, ProjectedLogits):
        return project_chunks(lambda z, i: gather_logprobs(z, i, chunk_elements=chunk_elements), logits, ids)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_ids = ids.reshape(-1, ids.shape[-1]).long()
    out = _GatherLogProbs.apply(flat_logits, flat_ids, _rows(logits, chunk_elements))
    return out.reshape(ids.shape)


def gather_logits(logits: Logits, ids: Tensor) -> Tensor:
    """logits[ids] (raw, not normalised): logits [..., V], ids [..., K] -> [..., K], logits' dtype."""
    if isinstance(logits, ProjectedLogits):
        return project_chunks(lambda z, i: z.gather(-1, i), logits, ids.long())
    return logits.gather(-1, ids.long())


def _dense(kernel: Any, student_logits: Logits, teacher_logits: Logits, chunk_elements: int | None) -> Tensor:
    """A dense per-position kernel on tensors, or chunk by chunk when the student is projected."""
    if isinstance(student_logits, ProjectedLogits):
        if isinstance(teacher_logits, ProjectedLogits):
            teacher = teacher_logits

            def on_chunk(z: Tensor, teacher_hidden: Tensor) -> Tensor:
                t = ProjectedLogits(teacher_hidden, teacher.weight.detach(), _detached(teacher.bias), 1, teacher.dtype)
                return _dense(kernel, z, t.materialize(), chunk_elements)

            return project_chunks(on_chunk, student_logits, teacher_logits.hidden)
        return project_chunks(lambda z, t: _dense(kernel, z, t, chunk_elements), student_logits, teacher_logits)
    if isinstance(teacher_logits, ProjectedLogits):
        teacher_logits = teacher_logits.materialize()
    vocab = student_logits.shape[-1]
    out: Tensor = kernel.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        _rows(student_logits, chunk_elements),
    )
    return out.reshape(student_logits.shape[:-1])


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def dense_reverse_kl(student_logits: Logits, teacher_logits: Logits, *, chunk_elements: int | None = None) -> Tensor:
    """KL(π‖p) = Σ_v π(v)[log π(v) − log p(v)] per position: logits [..., V] -> [...]."""
    return _dense(_DenseReverseKL, student_logits, teacher_logits, chunk_elements)


def dense_forward_kl(student_logits: Logits, teacher_logits: Logits, *, chunk_elements: int | None = None) -> Tensor:
    """KL(p‖π) = Σ_v p(v)[log p(v) − log π(v)] per position: logits [..., V] -> [...]."""
    return _dense(_DenseForwardKL, student_logits, teacher_logits, chunk_elements)
