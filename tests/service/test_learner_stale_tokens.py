"""stale_tokens: mask on a tiny Qwen3 learner: tokens older than version - max_staleness are
masked, counted (masked_stale_tokens) and do not move the weights — the teacher's scores at
those positions can be anything and the update stays the same (without the mask it changes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from asyncopd.learner.trainer import StepStats, Trainer
from asyncopd.opd import OPDLoss
from asyncopd.records import ScoredSample
from test_learner_step import RESPONSE, generate, load, scored_samples
from tiny_models import make_tiny_qwen3

pytestmark = pytest.mark.service

STALE = 2  # the first STALE tokens of every response come from weights 2; the rest from 3


def _train(student: Path, samples: list[ScoredSample], mask: bool) -> tuple[list[StepStats], torch.Tensor]:
    model = load(student)
    trainer = Trainer(
        model, OPDLoss("forward_kl_topk"), lr=5e-3, micro_batch_size=4, mask_stale_tokens_beyond=2 if mask else None
    )
    trainer.version = 5  # oldest usable: 3
    stats = trainer.train(samples)
    return stats, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_masked_stale_tokens_are_counted_and_do_not_move_the_weights(tmp_path: Path) -> None:
    student, teacher = make_tiny_qwen3(tmp_path / "s", seed=1), make_tiny_qwen3(tmp_path / "t", seed=2, scale=4.0)
    versions = np.full(RESPONSE, 3, np.int32)
    versions[:STALE] = 2
    samples = [
        dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, versions=versions))
        for s in scored_samples(generate(load(student), load(teacher), n=4), "forward_kl_topk")
    ]

    def shifted(s: ScoredSample) -> ScoredSample:  # other teacher scores at the stale positions only
        assert s.scores.topk_logprobs is not None
        lp = s.scores.topk_logprobs.copy()
        lp[:STALE] -= 1.5
        return dataclasses.replace(s, scores=dataclasses.replace(s.scores, topk_logprobs=lp))

    noisy = [shifted(s) for s in samples]
    stats, weights = _train(student, samples, mask=True)
    assert stats[0].metrics["masked_stale_tokens"] == 4 * STALE
    assert sum(s.tokens for s in stats) == 4 * (RESPONSE - STALE)
    _, noisy_weights = _train(student, noisy, mask=True)
    torch.testing.assert_close(weights, noisy_weights)
    # the same change moves the weights when nothing is masked (so the check above can fail)
    _, plain = _train(student, samples, mask=False)
    _, plain_noisy = _train(student, noisy, mask=False)
    assert not torch.allclose(plain, plain_noisy)
