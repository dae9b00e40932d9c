"""`asyncopd study --quick --calibrate` end to end: the lr is calibrated (the toy's and the wide
world's), every part trains (3 rollout batches of 4 optimizer steps), the probe draws, and the
report holds the drift table and the three parts' tables with their rows (part 2 with matched
ratio handling), every cell in study.json, and the plots. Part 4 (the wide world, a chat-template
task at 151,936 rows) trains every row for one batch of 4 rollouts cut at 48 tokens and reports
the dense held-out KL(π‖p) next to accuracy; the wide teacher's top-8 list misses ≥ 5 % of its
mass on the held-out sequences. The wide models are built on first use (`make wide` builds them
ahead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

PART1_ROWS = ["forward KL, teacher top-8 (forward_kl_topk)", "reverse KL, MC N=8, rollout-time signal, no correction"]
PART2_ROWS = [
    "recompute, clip 0.2 (advantage=recompute, correction=ppo_clip)",
    "recompute, unclipped (advantage=recompute, correction=is)",
    "PPO clip 0.2 = paper baseline (advantage=rollout, correction=ppo_clip)",
    "decoupled PPO, mask (advantage=rollout, correction=decoupled)",
    "decoupled PPO, truncate (advantage=rollout, correction=decoupled)",
    "M2PO dynamic clip (advantage=rollout, correction=m2po_clip)",
    "M2PO mask (advantage=rollout, correction=m2po)",
    "IS only (advantage=rollout, correction=is)",
    "none (advantage=rollout, correction=none)",
    "none + mean baseline (advantage=rollout, correction=none)",
]
DRIFT_ROW = "staleness as drift: median (log π_θ/μ)², cells that trained"
PROBE_ROWS = ["sparse top-8", "MC N=1", "MC N=4", "MC N=16", "MC N=64"]
PART3_ROWS = [
    "sparse top-8 (reverse_kl_topk, tail=bucket)",
    *(f"MC N={n} (reverse_kl_mc, recompute, is)" for n in (1, 4, 16, 32)),
]
PART4_ROWS = [
    "sparse top-8 (reverse_kl_topk, tail=bucket)",
    "sparse top-64 (reverse_kl_topk, tail=bucket)",
    *(f"MC N={n} (reverse_kl_mc, recompute, is)" for n in (1, 8, 64)),
    "forward top-8 (forward_kl_topk, lr ",  # + the lr: 1e-4, or the wide world's calibrated lr when smaller
    "forward top-64 (forward_kl_topk, lr ",
]
PLOTS = ["part1_accuracy", "part1_kl", "part2_accuracy", "part2_kl", "part3_gradients", "part3_accuracy"]


def _section(text: str, start: str, end: str | None) -> str:
    body = text.split(start, 1)[1]
    return body.split(end, 1)[0] if end else body


def _table_rows(section: str) -> list[str]:
    return [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.fixture(scope="module")
def wide_world() -> Path:
    from asyncopd.lab.toytrain.wide import world_ready

    assets = ROOT / "assets"
    if not world_ready(assets):
        build = [sys.executable, "-m", "asyncopd.cli", "toy", "wide", "--out", str(assets)]
        subprocess.run(build, cwd=ROOT, check=True, timeout=600)
    assert world_ready(assets)
    return assets


def test_quick_study_writes_tables_json_and_plots(tmp_path: Path, wide_world: Path) -> None:
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncopd.cli",
            "study",
            "-c",
            str(ROOT / "configs/toy.yaml"),
            "--quick",
            "--calibrate",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    md = (out / "study.md").read_text()
    drift = _section(md, "### Table 0", "## Part 1")
    assert _table_rows(drift) == ["s (versions)", "0", "1", "2"]
    assert "lr calibrated for 0.001 per version" in drift
    part1 = _section(md, "### Table 1a", "### Table 1b")
    assert _table_rows(part1) == ["estimator", *PART1_ROWS, DRIFT_ROW]
    assert "| estimator | s=0 | s=2 |" in part1
    part2 = _section(md, "### Table 2", "## Part 3")
    assert [r for r in _table_rows(part2) if r != "correction"] == [*PART2_ROWS, DRIFT_ROW]
    probe = _section(md, "### Table 3a", "### Table 3b")
    assert set(PROBE_ROWS) <= set(_table_rows(probe))
    part3 = _section(md, "### Table 3b", "## Part 4")
    assert _table_rows(part3) == ["estimator", *PART3_ROWS]
    part4 = _section(md, "## Part 4", "## What the toy shows")
    table4 = _table_rows(_section(part4, "### Table 4", None))
    assert len(table4) == 1 + len(PART4_ROWS) and table4[0] == "estimator"
    assert all(row.startswith(label) for row, label in zip(table4[1:], PART4_ROWS, strict=True)), table4
    assert "lr calibrated in this world for 0.001 per version" in part4
    assert _table_rows(part4)[:3] == ["model", "teacher", "student"]
    findings = _section(md, "## What the toy shows", "## Where it disagrees")
    for part in ("Part 1", "Part 2", "Part 3a", "Part 3b", "Part 4"):
        assert f"**{part} (" in findings

    data = json.loads((out / "study.json").read_text())
    keys = {c["key"] for c in data["cells"]}
    for part, staleness in (("part1", [0, 2]), ("part2", [2]), ("part3", [1])):
        for row in data["rows"][part]:
            for s in staleness:
                assert f"{' '.join(row['overrides'])} | s={s} | seed=0" in keys, (part, row["label"], s)
    for row in data["rows"]["part4"]:
        assert f"{' '.join(row['overrides'])} | s=1 | seed=0 | world=wide" in keys, row["label"]
    # part 1's 'none' row at s=2 is shared with part 2; part 4's 7 cells train in the wide world
    assert len(keys) == len(data["cells"]) == 18 + 7
    wide_cells = [c for c in data["cells"] if c["world"] == "wide"]
    assert len(wide_cells) == 7
    for cell in wide_cells:
        assert cell["behaviour_versions"] == [0] and 0.0 <= cell["accuracy"] <= 1.0
        assert cell["held_out"]["positions"] == 2 * 48  # two held-out teacher samples, cut at --quick's 48 tokens
        assert 0.0 < cell["held_out"]["reverse_kl"] < 5.0
    base = data["wide_baseline"]
    assert base["vocab_size"] == 151_936
    assert base["held_out"]["teacher_top8_missing"] >= 0.05  # the sparse cache has something to miss
    assert base["held_out"]["teacher_top64_missing"] < base["held_out"]["teacher_top8_missing"]
    toy_cells = [c for c in data["cells"] if c["world"] == "toy"]
    for cell in toy_cells:
        assert cell["held_out"]["reverse_kl"] > 0.0
        s = cell["staleness"]
        # versions count rollout batches (4 optimizer steps each), as in the paper's code
        assert cell["behaviour_versions"] == [max(0, t - s) for t in range(3)]
        assert cell["learner_versions"] == [0, 1, 2]
        assert len(cell["kl"]) == 3 and 0.0 <= cell["accuracy"] <= 1.0
        if "loss.kind=reverse_kl_mc" in cell["overrides"]:
            # measured before the batch's first update: ~0 when fresh, > 0 once stale
            measured = cell["metrics"]["drift"]
            assert len(measured) == 3 and measured[0] < 1e-8
            if s > 0:
                assert measured[-1] > 1e-8
    assert data["calibration"]["target"] == 1e-3 and len(data["calibration"]["rounds"]) >= 1
    wide_cal = data["wide_calibration"]  # the wide world gets its own lr, and its cells train at it
    assert wide_cal["target"] == 1e-3 and wide_cal["rounds"][0]["drift"] > 0
    assert f"learner.lr={wide_cal['lr']:g}" in data["wide_source"]["overrides"]
    assert data["size"]["minibatches_per_batch"] == 4
    assert set(data["probes"][0]["stats"]) >= set(PROBE_ROWS)

    for name in PLOTS:
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert f"({name}.png)" in md
