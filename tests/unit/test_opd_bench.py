"""`asyncopd bench estimators` end to end on a tiny vocabulary, and the bench registry."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from asyncopd.cli import main
from asyncopd.lab import bench as benchmarks
from asyncopd.lab.bench.estimators import REFERENCE

pytestmark = pytest.mark.unit


def test_bench_estimators_prints_a_row_per_estimator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "estimators", "--positions", "6", "--vocab", "40", "--k", "4", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("estimator ") :]
    for name in (REFERENCE, "forward_kl_topk renorm", "reverse_kl_topk bucket", "reverse_kl_mc m2po"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        seconds, ratio = row[len(name) :].split()[:2]
        # Printed rounded: a fast estimator next to a slow (loaded-machine) reference shows 0.00.
        assert float(seconds) >= 0
        assert float(ratio) >= 0
    reference_row = next(line for line in table.splitlines() if line.startswith(REFERENCE))
    assert reference_row.split()[-3] == "1.00"  # the reference's time ratio to itself


def test_register_adds_a_benchmark_once() -> None:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", type=int, default=3)

    def run(args: argparse.Namespace) -> int:
        return args.size

    benchmarks.register("unit-test-bench", add_args, run)
    try:
        assert main(["bench", "unit-test-bench", "--size", "7"]) == 7
        with pytest.raises(ValueError, match="already registered"):
            benchmarks.register("unit-test-bench", add_args, run)
    finally:
        del benchmarks.BENCHMARKS["unit-test-bench"]


def test_a_built_in_name_cannot_be_registered_again() -> None:
    with pytest.raises(ValueError, match="already registered"):
        benchmarks.register("cache-load", lambda parser: None, lambda args: 0)


def test_a_benchmarks_child_imports_only_its_own_module() -> None:
    """A process spawned for one benchmark (the cache of `bench cache-load`) imports that module
    and so the bench package; it must not import the other benchmarks (transformers, torch)."""
    code = (
        "import sys\n"
        "import asyncopd.lab.bench.cache_load\n"
        "print(sorted(m for m in ('transformers', 'torch', 'asyncopd.lab.bench.learner') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
