"""The toy teacher and student shipped in assets/: they load, share a tokenizer, and the teacher
is clearly better on the held-out split."""

from __future__ import annotations

import json

import pytest
from asyncopd.cli import main
from asyncopd.evaluation.greedy import evaluate, generate_greedy
from asyncopd.lab.toytrain.train import MAX_NEW_TOKENS
from asyncopd.models.loading import check_same_tokenizer, load_model, load_tokenizer
from asyncopd.tasks import load_toy_dataset
from asyncopd.tasks.toy.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE

pytestmark = pytest.mark.unit

TEACHER = "assets/toy-teacher"
STUDENT = "assets/toy-student"


def test_shipped_models_load_with_the_toy_tokenizer() -> None:
    for path in (TEACHER, STUDENT):
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
        assert model.config.head_dim >= 32  # vLLM's CPU attention rejects smaller heads
        assert (model.generation_config.eos_token_id, tokenizer.eos_token_id) == (EOS_ID, EOS_ID)
        assert tokenizer.pad_token_id == PAD_ID
    check_same_tokenizer(load_tokenizer(STUDENT), load_tokenizer(TEACHER))


def test_teacher_beats_student_on_held_out_problems() -> None:
    items = list(load_toy_dataset("test", 50, seed=123))
    accuracy = {}
    for path in (TEACHER, STUDENT):
        result = evaluate(load_model(path), load_tokenizer(path), items, MAX_NEW_TOKENS, batch_size=50)
        accuracy[path] = result.accuracy
    assert accuracy[TEACHER] >= 0.8
    assert accuracy[TEACHER] - accuracy[STUDENT] >= 0.2


def test_batched_left_padded_generation_equals_one_prompt_at_a_time() -> None:
    # The student: its wrong answers vary in length, so the batch's EOS positions differ too.
    model, tokenizer = load_model(STUDENT), load_tokenizer(STUDENT)
    # Different prompt lengths, so the batch really is padded.
    prompts = [it.prompt for it in load_toy_dataset("test", 4, seed=5)] + ["Q:1+2*3=? A:"]
    assert len({len(p) for p in prompts}) > 1
    batched = generate_greedy(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=len(prompts))
    single = [generate_greedy(model, tokenizer, [p], MAX_NEW_TOKENS)[0] for p in prompts]
    assert batched == single


def test_eval_cli_prints_accuracy_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", TEACHER, "--task", "toy", "--n", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert report["n"] == 20
    assert 0.0 <= report["accuracy"] <= 1.0
