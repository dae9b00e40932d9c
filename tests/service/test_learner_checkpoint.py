"""Checkpoint -> resume of the trainer: same version, bit-identical weights, identical next step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from asyncopd.learner import checkpoint
from asyncopd.learner.trainer import Trainer
from asyncopd.opd import OPDLoss
from test_learner_step import Generated, generate, load, scored_samples
from tiny_models import make_tiny_qwen3
from transformers import Qwen3ForCausalLM

pytestmark = pytest.mark.service


def flat(model: Qwen3ForCausalLM) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def make_trainer(model: Qwen3ForCausalLM) -> Trainer:
    return Trainer(model, OPDLoss("reverse_kl_mc", correction="is"), lr=5e-3, warmup_steps=3, micro_batch_size=4)


def test_resume_continues_at_the_same_version_with_identical_weights(tmp_path: Path) -> None:
    student_dir = make_tiny_qwen3(tmp_path / "student", seed=1)
    teacher_dir = make_tiny_qwen3(tmp_path / "teacher", seed=2, scale=4.0)
    generated: Generated = generate(load(student_dir), load(teacher_dir), n=8)
    samples = scored_samples(generated, "reverse_kl_mc")

    model = load(student_dir)
    trainer = make_trainer(model)
    trainer.train(samples)
    trainer.train(samples)
    torch.manual_seed(1234)
    path = checkpoint.save(tmp_path / "ckpt", model, trainer.state_dict(), keep=1)
    assert checkpoint.latest(tmp_path / "ckpt") == path

    resumed_model = load(path)  # a plain HF directory: what vLLM or transformers would load
    resumed = make_trainer(resumed_model)
    state = checkpoint.load_state(path)
    resumed.load_state_dict(state["trainer"])
    checkpoint.set_rng_state(state["rng"])
    assert resumed.version == trainer.version == 2
    assert torch.equal(flat(resumed_model), flat(model))
    resumed_rng = torch.rand(3)

    # The optimizer moments, LR schedule (mid warm-up) and RNG came back too: the next step matches.
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), resumed_rng)
    trainer.train(samples)
    resumed.train(samples)
    assert resumed.version == trainer.version == 3
    assert torch.equal(flat(resumed_model), flat(model))


def test_latest_survives_a_second_save_and_prunes(tmp_path: Path) -> None:
    model = load(make_tiny_qwen3(tmp_path / "student", seed=1))
    trainer = make_trainer(model)
    for version in (1, 2, 3):
        trainer.version = version
        checkpoint.save(tmp_path / "ckpt", model, trainer.state_dict(), keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000002", "step-00000003"]
    latest = checkpoint.latest(tmp_path / "ckpt")
    assert latest is not None and latest.name == "step-00000003"
    assert checkpoint.load_state(latest)["trainer"]["version"] == 3
