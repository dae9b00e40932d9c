"""`asyncopd bench rollout` and `asyncopd bench teacher` run end to end on the toy models."""

from __future__ import annotations

import json

import pytest
from asyncopd.cli import main

pytestmark = pytest.mark.service


def test_bench_rollout_reports_tokens_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "rollout", "--engines", "transformers", "--prompts", "4", "--max-tokens", "6"]
    assert main([*args, "--repeats", "1", "--k", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["support"]: r for r in report["results"]}
    assert set(rows) == {"none", "topk", "mc"}
    for row in rows.values():
        assert row["engine"] == "transformers" and 4 <= row["tokens"] <= 24 and row["tokens_per_s"] > 0


def test_bench_teacher_reports_scored_tokens_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "teacher", "--rollouts", "6", "--response-tokens", "5", "--max-batch-tokens", "64,4096"]
    assert main([*args, "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["max_batch_tokens"] for r in report["results"]] == [64, 4096]
    assert all(r["tokens"] == 30 and r["scored_tokens_per_s"] > 0 for r in report["results"])
