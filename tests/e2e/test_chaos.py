"""`asyncopd chaos` as a user runs it: the toy pipeline with every default fault kind injected
once (rollout replicas killed three times and one started mid-run, a teacher and the cache killed
and restarted, Redis killed and restarted from its append-only file, then wiped, then rolled back
to an append-only file cut short, the learner killed and resumed from its checkpoint and killed
again right after a checkpoint, a replica frozen through weight broadcasts, issue #20's rogue
client attacks, a poison sample that kills its teacher on every delivery, a replica cut off
weight sync while it generates).

The run must survive every fault and pass every check (nothing unaccounted over the Redis
wipe, no sample and no prompt position trained twice, none skipped, versions monotonic) and the
student must still learn. The
checks themselves are shown to catch violations in tests/unit/test_chaos_checks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from asyncopd.lab.chaos.faults import KINDS, OPT_IN

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
    timeline = "\n".join(
        f"{f['label']}: fired v{f.get('fired_version')} recovered v{f.get('recovered_version')} ({f.get('detail')})"
        for f in result.get("faults", [])
    )
    assert result["passed"], f"problems: {result['problems']}\nfaults:\n{timeline}\n{proc.stderr[-3000:]}\n{logs}"
    assert proc.returncode == 0

    assert {f["kind"] for f in result["faults"]} == set(KINDS) - set(OPT_IN), "every default fault kind was injected"
    assert result["faults_injected"] == result["faults_survived"] == 16
    assert result["samples_lost"] == 0
    accounting = result["accounting"]
    assert accounting["redis_epochs"] == 2, "the wipe starts a second Redis epoch"
    assert accounting["produced"] == accounting["trained"] + accounting["dropped_total"] + accounting["in_flight"]
    assert accounting["trained"] >= STEPS * 32 // 2
    assert result["run"]["steps"] >= STEPS, "the run trains at least the steps asked for"
    assert accounting["dropped"].get("poison", 0) > 0, "the poison sample was dropped as poison"
    step_log = result["step_log"]
    assert step_log["starts"] == 3, "the learner was killed twice and resumed twice"
    assert step_log["trained_twice"] == [] and step_log["version_regressions"] == []
    assert step_log["positions_trained_twice"] == [] and result["positions_skipped"] == 0
    assert step_log["positions_trained"] > 0 and step_log["unparsed_sample_ids"] == 0
    assert step_log["missing_sample_ids"] == 0
    assert result["accuracy"]["after"] > result["accuracy"]["before"], "the student still learned"
    assert "PASSED" in (out / "chaos.md").read_text()
