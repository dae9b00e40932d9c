"""Greedy accuracy of the student before and after a local run, and where the trained one is.

Runs in the launcher's process on the task's test split (through `asyncopd.evaluation.greedy`); it
finds the trained student through the learner's checkpoint layout (`LATEST` names the newest
complete checkpoint). It knows models and files; nothing about the services.
"""

from __future__ import annotations

import os
from pathlib import Path

from asyncopd.config import RunConfig


def evaluate_accuracy(model_path: str, config: RunConfig) -> float:
    """Greedy accuracy of a model directory on the task's test split (in this process)."""
    import torch

    from asyncopd.evaluation.greedy import evaluate
    from asyncopd.models.chat import prompt_formatter
    from asyncopd.models.loading import load_model, load_tokenizer
    from asyncopd.tasks import load_task

    # The launcher shares the machine with nothing at this point; cap threads anyway so an
    # evaluation never starves the services of a small machine.
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    # The prompts the run trains on: with task.chat_template, wrapped in the student's template
    # (teacher and student share a tokenizer, so the teacher is evaluated on the same text).
    items = list(load_task(config.task, "test", prompt_formatter(config.models.student, config.task)))
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, config.models.dtype, "cpu")
    result = evaluate(model, tokenizer, items, config.rollout.sampling.max_tokens, batch_size=128)
    return result.accuracy


def final_student_dir(checkpoint_dir: Path) -> Path | None:
    """The learner's newest checkpoint (named by its `LATEST` file), else the newest HF model
    directory (holds config.json and weights) under the checkpoint dir."""
    if not checkpoint_dir.is_dir():
        return None
    latest = checkpoint_dir / "LATEST"
    if latest.is_file():
        named = checkpoint_dir / latest.read_text().strip()
        if (named / "config.json").is_file():
            return named
    candidates = [p.parent for p in checkpoint_dir.rglob("config.json") if (p.parent / "config.json").is_file()]
    weights = [c for c in candidates if any(c.glob("*.safetensors")) or any(c.glob("*.bin"))]
    if not weights:
        return None
    return max(weights, key=lambda p: (p / "config.json").stat().st_mtime)
