"""An interrupted `asyncopd run`, continued with `--resume`: the learner starts from the
checkpoint it wrote when it was stopped, the step log is appended to (versions go on without a
repeat, and without a gap but the restart's jump of max_staleness + 2) and the run ends at its
configured step count, in the same directory. The
resumed segment also runs the sampled evaluator beside the learner (`--eval-samples`)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Two starts of the whole pipeline (~100 s idle, 135-200 s on the loaded 2-core box).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Long enough that the interruption lands mid-run on a fast idle machine too: between the second
# logged step and the learner's stop, the producers' shutdown lets it train on (a fresh CI clone
# once trained all of 10 steps before the SIGINT took effect); a toy step is ~0.1-1 s.
STEPS = 120
# A bound of 1 keeps at most two batches in flight: once the launcher has stopped the producers
# (newest first), the learner cannot train far past the step it was interrupted at.
SMALL = [
    "--set",
    "max_staleness=1",
    "--set",
    f"learner.steps={STEPS}",
    "--set",
    "learner.batch_size=4",
    "--set",
    "rollout.batch_size=4",
    "--set",
    "learner.eval_every=0",
    "--set",
    "learner.warmup_steps=0",
    "--set",
    "task.test_size=16",
]
FLAGS = ["--no-live", "--no-eval", "--no-plots", "--startup-timeout-s", "200"]


def _steps(log: Path) -> list[dict]:  # type: ignore[type-arg]
    lines = log.read_text().splitlines() if log.exists() else []
    return [r for r in (json.loads(line) for line in lines if line.strip())]


def test_an_interrupted_run_resumed_continues_its_versions_and_step_log(tmp_path: Path) -> None:
    template = str(tmp_path / "runs/{name}/{timestamp}")
    argv = [sys.executable, "-m", "asyncopd.cli", "run", "-c", str(ROOT / "configs/toy.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [*argv, "--set", f"output_dir={template}", *SMALL, *FLAGS],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = tmp_path / "runs/toy/latest"
    try:
        deadline = time.monotonic() + 300
        # Interrupt mid-training: two steps logged, the run not finished.
        while sum(r.get("event") == "step" for r in _steps(latest / "learner_steps.jsonl")) < 2:
            assert first.poll() is None, f"asyncopd run exited early ({first.returncode})"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    run_dir = latest.resolve()
    before = _steps(run_dir / "learner_steps.jsonl")
    stopped_at = max(r["version"] for r in before if r.get("event") == "step")
    assert stopped_at < STEPS, "the run was interrupted before its last step"
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir(), "the learner checkpointed on SIGTERM"

    # --resume PATH without -c: the run's own run-config.yaml (steps, batch sizes) is used.
    resumed = subprocess.run(
        # ... with the sampled evaluator beside the learner (a process reading checkpoints only)
        [sys.executable, "-m", "asyncopd.cli", "run", "--resume", str(latest), "--eval-samples", "2", *FLAGS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((run_dir / "logs").glob("*.log")))
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stderr[-4000:]}\n{logs}"
    assert latest.resolve() == run_dir, "the resumed run stays in its own directory"
    assert [p.name for p in (tmp_path / "runs/toy").iterdir() if p.name != "latest"] == [run_dir.name]

    records = _steps(run_dir / "learner_steps.jsonl")
    assert records[: len(before)] == before, "the step log was appended to, not rewritten"
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["checkpoint_version"] for s in starts] == [None, stopped_at]
    # a restart starts at max(published, checkpoint) + max_staleness + 2 (asyncopd.cache.policy):
    # past every version a replica of the first run may have stamped tokens with
    jumped = stopped_at + 1 + 2
    assert (starts[1]["version"], starts[1]["version_jump"]) == (jumped, jumped - stopped_at)
    steps = [r for r in records if r.get("event") == "step"]
    versions = [s["version"] for s in steps]
    assert versions == sorted(set(versions)), f"versions repeat or go back: {versions}"
    assert versions[-1] == STEPS
    for prev, step in itertools.pairwise(steps):
        want = jumped if prev["version"] == stopped_at else prev["version"]  # the one jump: the restart
        assert step["version_before"] == want, f"a gap in the versions: {versions}"
    assert all(s["version"] > stopped_at for s in steps[len([b for b in before if b.get("event") == "step"]) :])

    report = json.loads((run_dir / "report.json").read_text())
    assert report["resumed_from_version"] == stopped_at
    assert report["steps"] == STEPS
    assert report["invariant_violations"] == []
    # The evaluator never held the learner up, and the final checkpoint was evaluated after it stopped.
    sampled = report["sampled_eval"]
    assert sampled and sampled[-1]["version"] == STEPS
    assert all(0.0 <= r["avg@2"] <= r["pass@2"] <= 1.0 and r["prompts"] == 16 for r in sampled)
    assert [json.loads(line)["version"] for line in (run_dir / "eval_steps.jsonl").read_text().splitlines()] == [
        r["version"] for r in sampled
    ]
