"""`asyncopd chaos` as a user runs it: the toy pipeline with every fault kind injected once
(rollout replicas killed three times and one started mid-run, a teacher and the cache killed
and restarted, Redis killed and restarted from its append-only file and then wiped, the
learner killed and resumed from its checkpoint, a replica frozen through weight broadcasts).

The run must survive every fault and pass every check (nothing unaccounted over the Redis
wipe, no sample trained twice, versions monotonic) and the student must still learn. The
checks themselves are shown to catch violations in tests/unit/test_chaos_checks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from asyncopd.lab.chaos.faults import KINDS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = 160


def test_every_fault_kind_is_survived_without_losing_a_sample(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    argv = [
        sys.executable,
        "-m",
        "asyncopd.cli",
        "chaos",
        "-c",
        str(ROOT / "configs/chaos.yaml"),
        "--set",
        f"learner.steps={STEPS}",
        "--set",
        "task.test_size=100",
        "--no-baseline",
        "--out",
        str(out),
        "--max-wall-s",
        "700",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    result_path = out / "chaos.json"
    assert result_path.is_file(), f"no chaos.json ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(result_path.read_text())
    logs = "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-10:])
        for p in sorted((out / "faults" / "logs").glob("*.log"))
    )
    assert result["passed"], f"problems: {result['problems']}\n{proc.stderr[-3000:]}\n{logs}"
    assert proc.returncode == 0

    assert {f["kind"] for f in result["faults"]} == set(KINDS), "every fault kind was injected"
    assert result["faults_injected"] == result["faults_survived"] == 10
    assert result["samples_lost"] == 0
    accounting = result["accounting"]
    assert accounting["redis_epochs"] == 2, "the wipe starts a second Redis epoch"
    assert accounting["produced"] == accounting["trained"] + accounting["dropped_total"] + accounting["in_flight"]
    assert accounting["trained"] >= STEPS * 32 // 2
    assert result["run"]["steps"] >= STEPS, "the run trains at least the steps asked for"
    step_log = result["step_log"]
    assert step_log["starts"] == 2, "the learner was killed once and resumed once"
    assert step_log["trained_twice"] == [] and step_log["version_regressions"] == []
    assert step_log["missing_sample_ids"] == 0
    assert result["accuracy"]["after"] > result["accuracy"]["before"], "the student still learned"
    assert "PASSED" in (out / "chaos.md").read_text()
