"""Toy training: the supervised targets and a short run that saves a loadable HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from asyncopd.lab.toytrain.train import METADATA_FILE, default_settings, encode_examples, save, train
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.tasks.toy import task
from asyncopd.tasks.toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer

pytestmark = pytest.mark.unit


def test_labels_cover_response_and_eos_only() -> None:
    problems = [
        task.Problem(operands=(7, 5, 3, 4), operators=("+", "*", "-")),
        task.Problem(operands=(1, 2, 3), operators=("+", "+")),
    ]
    tokenizer = build_tokenizer()
    input_ids, labels = encode_examples(tokenizer, problems)
    for row, problem in enumerate(problems):
        n_prompt, n_response = len(problem.prompt), len(problem.response) + 1
        assert tokenizer.decode(input_ids[row, :n_prompt].tolist()) == problem.prompt
        assert (labels[row, :n_prompt] == -100).all()
        target = labels[row, n_prompt : n_prompt + n_response].tolist()
        assert target[-1] == EOS_ID
        assert tokenizer.decode(target[:-1]) == problem.response
        assert (labels[row, n_prompt + n_response :] == -100).all()
        assert (input_ids[row, n_prompt + n_response :] == PAD_ID).all()


def test_short_training_run_lowers_loss_and_saves_a_loadable_model(tmp_path: Path) -> None:
    settings = default_settings(
        "student", steps=30, batch_size=16, train_size=512, val_size=8, eval_every=10, stop_accuracy=None
    )
    model, metadata = train(settings, log=lambda line: None)
    assert metadata["steps_done"] == 30 and metadata["stop_reason"] == "steps"
    losses = [entry["loss"] for entry in metadata["history"]]
    assert len(losses) == 3
    # ln(32) ≈ 3.47 is a uniform guess over the vocabulary; 30 steps learn the format's easy part.
    assert losses[-1] < losses[0] and losses[-1] < 2.5
    save(model, metadata, tmp_path)
    reloaded, tokenizer = load_model(str(tmp_path)), load_tokenizer(str(tmp_path))
    assert reloaded.config.num_hidden_layers == 2 and len(tokenizer) == reloaded.config.vocab_size
    assert json.loads((tmp_path / METADATA_FILE).read_text())["settings"]["role"] == "student"
