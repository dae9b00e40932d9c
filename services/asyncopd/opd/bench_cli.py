"""`asyncopd bench estimators`: arguments and entry of the OPD estimator benchmark.

Only argparse lives here; the measurement is in `asyncopd.opd.benchmark`, imported when the
benchmark runs. `asyncopd.benchmarks` registers `add_args` and `run` under the name
"estimators".
"""

from __future__ import annotations

import argparse

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
    import torch

    from asyncopd.opd.benchmark import BenchResult, format_table, run_estimators

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
