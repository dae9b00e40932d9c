"""The evaluator off the training path: Avg@n and pass@k arithmetic, and a watcher that
evaluates each checkpoint the learner publishes (files only: no learner to wait on)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from asyncopd.config import config_from_dict
from asyncopd.evaluation.sampled import pass_at_k, summarize
from asyncopd.evaluation.watcher import EvalSettings, Evaluator, main, newest_checkpoint

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]


def test_pass_at_k_is_the_unbiased_estimate_and_avg_at_n_the_mean_accuracy() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    result = summarize([0, 1, 4], n=4, ks=[1, 2, 4, 8])
    assert result.avg_at_n == pytest.approx((0 + 0.25 + 1) / 3)
    assert result.pass_at[1] == pytest.approx(result.avg_at_n), "pass@1 is Avg@n"
    assert result.pass_at[2] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result.pass_at[4] == pytest.approx(2 / 3)
    assert 8 not in result.pass_at, "k > n is not estimable"
    assert result.summary()["avg@4"] == result.avg_at_n


def _checkpoint(root: Path, version: int) -> Path:
    path = root / f"step-{version:08d}"
    shutil.copytree(ROOT / "assets/toy-student", path)
    (path / "learner.json").write_text(json.dumps({"version": version}))
    (root / "LATEST").write_text(path.name)
    return path


def test_the_watcher_evaluates_each_new_checkpoint_once(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    config = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "task": {"test_size": 8},
            "rollout": {"sampling": {"max_tokens": 16, "stop": []}},
            "learner": {"checkpoint_dir": str(checkpoints)},
        }
    )
    evaluator = Evaluator(config, EvalSettings(n=2, ks=(1, 2), poll_s=0.1))
    assert newest_checkpoint(checkpoints) is None and evaluator.poll() is None, "nothing published yet"
    _checkpoint(checkpoints, 3)
    first = evaluator.poll()
    assert first is not None and first["event"] == "eval" and first["version"] == 3
    assert first["prompts"] == 8 and first["n"] == 2
    assert 0.0 <= first["avg@2"] <= first["pass@2"] <= 1.0
    assert first["pass@1"] == pytest.approx(first["avg@2"])
    assert evaluator.poll() is None, "the same checkpoint is not evaluated twice"
    (checkpoints / "LATEST").write_text("step-00000009")  # named but pruned/not yet there: skipped
    assert evaluator.poll() is None
    _checkpoint(checkpoints, 5)
    assert evaluator.poll()["version"] == 5  # type: ignore[index]
    lines = [json.loads(line) for line in (tmp_path / "eval_steps.jsonl").read_text().splitlines()]
    assert [r["version"] for r in lines] == [3, 5]

    # the process entry point (what `asyncopd run --eval-samples` starts), once
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    _checkpoint(checkpoints, 7)
    out = tmp_path / "once.jsonl"
    assert main(["-c", str(path), "--n", "2", "--k", "1,2", "--once", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["version"] == 7
