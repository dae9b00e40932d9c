"""Time and peak memory of every OPD estimator (forward + backward) against a dense reference.

Inputs are synthetic (random student/teacher logits, the teacher's top-K, the behaviour
student's top-K and N samples from it); only the cost of the loss is measured, not a model.

Memory is the process's resident-set high-water mark during one forward + backward call minus
the resident set just before it, read from Linux /proc/self/status (VmHWM, reset by writing
"5" to /proc/self/clear_refs). tracemalloc cannot see torch's C++ allocations and
`resource.ru_maxrss` never resets, which is why neither is used. The figure includes every
temporary and the [positions, V] gradient of the logits (which every estimator must produce),
but not the inputs, which exist before the call. Where the clear_refs reset is unavailable
(not Linux), memory is reported as n/a. glibc keeps freed blocks below its mmap threshold in
the heap, where the next call would reuse them without raising RSS; the heap is therefore
trimmed (malloc_trim) before each call, so each call's temporaries count from their first touch.
`add_args` and `run` at the bottom are the `asyncopd bench estimators` entry.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from asyncopd.opd.estimators import (
    forward_kl_full,
    forward_kl_topk,
    reverse_kl_full,
    reverse_kl_mc,
    reverse_kl_topk,
)
from asyncopd.opd.vocab import gather_logprobs

REFERENCE = "dense reverse KL, plain autograd"
"""The row every ratio is relative to: what one writes without this library."""

Estimator = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BenchResult:
    """One estimator's cost for one forward + backward over all positions."""

    name: str
    seconds: float
    """Fastest of the repeats."""
    peak_bytes: int | None
    """Largest RSS high-water delta over the repeats; None where it cannot be measured."""


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory(libc: ctypes.CDLL | None) -> None:
    """Make freed blocks leave the resident set, so the next call's peak is its own."""
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel interface is missing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(estimator: Estimator, logits: Tensor, repeats: int) -> tuple[float, int | None]:
    """Fastest wall time and largest peak-memory delta of `estimator(logits).sum().backward()`.

    On CPU the delta is of the resident set (see the module docstring); on CUDA it is
    torch.cuda.max_memory_allocated during the call minus memory_allocated before it (bytes in
    live tensors, not the caching allocator's reserve), after one untimed warm-up call.
    """
    if logits.is_cuda:
        return _measure_cuda(estimator, logits, repeats)
    libc = _glibc()
    best, peak = math.inf, 0
    measurable = True
    for _ in range(repeats):
        logits.grad = None
        _return_freed_memory(libc)
        measurable = measurable and _reset_peak_rss()
        before = _status_kib("VmRSS") if measurable else 0
        start = time.perf_counter()
        estimator(logits).sum().backward()
        best = min(best, time.perf_counter() - start)
        if measurable:
            peak = max(peak, (_status_kib("VmHWM") - before) * 1024)
    logits.grad = None
    return best, (peak if measurable else None)


def _measure_cuda(estimator: Estimator, logits: Tensor, repeats: int) -> tuple[float, int]:
    device = logits.device
    estimator(logits).sum().backward()  # warm-up: kernel loading and allocator growth
    best, peak = math.inf, 0
    for _ in range(repeats):
        logits.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        estimator(logits).sum().backward()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
    logits.grad = None
    return best, peak


def _dense_reverse_autograd(teacher_logits: Tensor) -> Estimator:
    def estimator(student_logits: Tensor) -> Tensor:
        log_pi = torch.log_softmax(student_logits.float(), dim=-1)
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        return (log_pi.exp() * (log_pi - log_p)).sum(-1)

    return estimator


def estimator_cases(
    positions: int, vocab: int, k: int, *, seed: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[Tensor, dict[str, Estimator]]:
    """Student logits [positions, V] (leaf) and the estimators to run on them, reference first."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (positions, vocab)
    student = torch.randn(shape, generator=gen, device=device).mul_(3).to(dtype).requires_grad_()
    # teacher = student + noise; behaviour μ sits 30% of the way from the student to the teacher
    # (μ ≠ π_θ, so ratios, clipping and masking are exercised). Few full-size passes: setup is
    # not what is measured, and on a shared 2-core machine it would dominate the run time.
    teacher = torch.randn(shape, generator=gen, device=device).add_(student.detach()).to(dtype)
    with torch.no_grad():
        teacher_lse = torch.logsumexp(teacher.float(), dim=-1, keepdim=True)
        teacher_topk_logits, teacher_topk = teacher.float().topk(k, dim=-1)
        teacher_topk_lp = teacher_topk_logits - teacher_lse
        behavior = torch.lerp(student.detach().float(), teacher.float(), 0.3).log_softmax(-1)
        support = behavior.topk(k, dim=-1).indices
        support_teacher = teacher.float().gather(-1, support) - teacher_lse
        samples = torch.multinomial(behavior.exp(), k, replacement=True, generator=gen)
        samples_behavior = behavior.gather(-1, samples)
        del behavior
        samples_teacher = teacher.float().gather(-1, samples) - teacher_lse
        samples_proximal = gather_logprobs(student.detach(), samples)
    mc_args = (samples, samples_teacher, samples_behavior)
    cases: dict[str, Estimator] = {
        REFERENCE: _dense_reverse_autograd(teacher),
        "reverse_kl_full (chunked)": lambda z: reverse_kl_full(z, teacher),
        "forward_kl_full (chunked)": lambda z: forward_kl_full(z, teacher),
        "forward_kl_topk drop": lambda z: forward_kl_topk(z, teacher_topk, teacher_topk_lp, tail="drop"),
        "forward_kl_topk bucket": lambda z: forward_kl_topk(z, teacher_topk, teacher_topk_lp, tail="bucket"),
        "forward_kl_topk renorm": lambda z: forward_kl_topk(z, teacher_topk, teacher_topk_lp, tail="renorm"),
        "reverse_kl_topk drop": lambda z: reverse_kl_topk(z, support, support_teacher, tail="drop"),
        "reverse_kl_topk bucket": lambda z: reverse_kl_topk(z, support, support_teacher, tail="bucket"),
        "reverse_kl_mc recompute+is": lambda z: reverse_kl_mc(z, *mc_args, correction="is"),
        "reverse_kl_mc ppo_clip": lambda z: reverse_kl_mc(z, *mc_args, correction="ppo_clip"),
        "reverse_kl_mc decoupled": lambda z: reverse_kl_mc(
            z, *mc_args, correction="decoupled", proximal_logprobs=samples_proximal
        ),
        "reverse_kl_mc m2po": lambda z: reverse_kl_mc(z, *mc_args, correction="m2po"),
    }
    return student, cases


def run_estimators(
    positions: int,
    vocab: int,
    k: int,
    *,
    repeats: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    only: tuple[str, ...] = (),
    progress: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Measure every case (or those whose name contains one of `only`; the reference always runs)."""
    logits, cases = estimator_cases(positions, vocab, k, seed=seed, dtype=dtype, device=device)
    results = []
    for name, estimator in cases.items():
        if only and name != REFERENCE and not any(part in name for part in only):
            continue
        seconds, peak = measure(estimator, logits, repeats)
        result = BenchResult(name=name, seconds=seconds, peak_bytes=peak)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def format_table(results: list[BenchResult]) -> str:
    """A fixed-width table with time and peak memory, and both as ratios to the reference row."""
    reference = next(r for r in results if r.name == REFERENCE)
    width = max(len(r.name) for r in results)
    lines = [
        f"{'estimator':<{width}}  {'time s':>8}  {'x ref':>6}  {'peak MiB':>9}  {'x ref':>6}",
        "-" * (width + 38),
    ]
    for r in results:
        mem = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        mem_ratio = (
            "n/a" if r.peak_bytes is None or not reference.peak_bytes else f"{r.peak_bytes / reference.peak_bytes:.2f}"
        )
        lines.append(
            f"{r.name:<{width}}  {r.seconds:>8.3f}  {r.seconds / reference.seconds:>6.2f}  {mem:>9}  {mem_ratio:>6}"
        )
    return "\n".join(lines)


_DTYPES = ("float32", "bfloat16", "float16")


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of `asyncopd bench estimators`; defaults are a Qwen3 vocabulary and top-64/64 samples."""
    parser.add_argument("--positions", type=int, default=2048, help="token positions in the batch")
    parser.add_argument("--vocab", type=int, default=151_669, help="vocabulary size V (Qwen3: 151,669)")
    parser.add_argument("--k", type=int, default=64, help="K top-k ids and N MC samples per position")
    parser.add_argument("--repeats", type=int, default=1, help="runs per estimator; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: on a shared 2-core machine "
        "OpenMP threads spin-wait on each other and a 2-thread run is many times slower than 1",
    )
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the student logits")
    parser.add_argument(
        "--only", nargs="*", default=[], metavar="SUBSTRING", help="run only estimators whose name contains one"
    )


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def progress(result: BenchResult) -> None:
        print(f"  measured {result.name}: {result.seconds:.3f} s", flush=True)

    print(
        f"OPD estimators, forward + backward: positions={args.positions} V={args.vocab} K=N={args.k} "
        f"dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} repeats={args.repeats}",
        flush=True,
    )
    results = run_estimators(
        args.positions,
        args.vocab,
        args.k,
        repeats=args.repeats,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        only=tuple(args.only),
        progress=progress,
    )
    print(format_table(results))
    grad_mib = args.positions * args.vocab * getattr(torch, args.dtype).itemsize / 2**20
    how = (
        "torch.cuda.max_memory_allocated during the call minus memory_allocated before it"
        if torch.device(args.device).type == "cuda"
        else "resident-set high-water mark during the call minus resident set before it (/proc/self VmHWM)"
    )
    print(
        f"peak MiB = {how}; includes the [positions, V] logits gradient ({grad_mib:.0f} MiB, which every "
        "estimator must produce), excludes the inputs."
    )
    return 0
