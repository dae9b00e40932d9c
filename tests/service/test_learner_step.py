"""Learner updates on tiny Qwen3 models: every estimator lowers the true KL on its batch.

Scored samples are built in-process: the student samples responses (recording behaviour
log-probs, its top-K and N MC draws), and a teacher forward pass scores them — exactly the
fields the rollout and teacher services would send. The check uses the dense KL (the quantity
each estimator targets), computed from both models, before and after a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from asyncopd.learner.batching import collate
from asyncopd.learner.trainer import Trainer, response_logits
from asyncopd.opd import LossInputs, LossOutputs, OPDLoss, forward_kl_full, gather_logprobs, reverse_kl_full
from asyncopd.records import Rollout, ScoredSample, SupportKind, TaskInfo, TeacherScores
from tiny_models import make_tiny_qwen3
from transformers import Qwen3ForCausalLM

pytestmark = pytest.mark.service

K = 6
RESPONSE = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_tiny_qwen3(root / "student", seed=1), make_tiny_qwen3(root / "teacher", seed=2, scale=4.0)


def load(path: Path) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM.from_pretrained(path)
    model.eval()
    return model


Generated = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.no_grad()
def generate(student: Qwen3ForCausalLM, teacher: Qwen3ForCausalLM, n: int, seed: int = 0) -> Generated:
    """n sampled responses, batched: prompts [n, P], responses [n, T], student/teacher log-probs [n, T, V]."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, student.config.vocab_size, (n, 5), generator=g)
    seq = prompts
    for _ in range(RESPONSE):
        probs = student(seq).logits[:, -1].softmax(-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], 1)
    p = prompts.shape[1]
    s_lp = student(seq).logits[:, p - 1 : -1].log_softmax(-1)
    t_lp = teacher(seq).logits[:, p - 1 : -1].log_softmax(-1)
    return prompts, seq[:, p:], s_lp, t_lp


def scored_samples(generated: Generated, kind: str, seed: int = 0) -> list[ScoredSample]:
    """What the rollout and teacher services would send for `kind`, from one generation."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, s_lps, t_lps = generated
    out = []
    for i in range(prompts.shape[0]):
        prompt, response, s_lp, t_lp = prompts[i], responses[i], s_lps[i], t_lps[i]
        behavior = s_lp.gather(1, response[:, None])[:, 0]
        support_kind, support_ids = SupportKind.NONE, None
        if kind == "reverse_kl_topk":
            support_kind, support_ids = SupportKind.STUDENT_TOPK, s_lp.topk(K, -1).indices
        elif kind == "reverse_kl_mc":
            draws = torch.multinomial(s_lp.exp(), K - 1, replacement=True, generator=g)
            support_kind, support_ids = SupportKind.MC_SAMPLES, torch.cat([response[:, None], draws], 1)
        topk = t_lp.topk(K, -1)
        rollout = Rollout(
            sample_id=f"s{i}",
            prompt_id=f"p{i}",
            ticket="",
            task=TaskInfo("toy", "0"),
            prompt_ids=prompt.numpy().astype(np.int32),
            response_ids=response.numpy().astype(np.int32),
            behavior_logprobs=behavior.numpy().astype(np.float32),
            versions=np.zeros(RESPONSE, np.int32),
            support_kind=support_kind,
            support_ids=None if support_ids is None else support_ids.numpy().astype(np.int32),
            support_logprobs=None if support_ids is None else s_lp.gather(1, support_ids).numpy().astype(np.float32),
        )
        scores = TeacherScores(
            sample_id=f"s{i}",
            token_logprobs=t_lp.gather(1, response[:, None])[:, 0].numpy(),
            topk_ids=topk.indices.numpy().astype(np.int32),
            topk_logprobs=topk.values.numpy().astype(np.float32),
            support_logprobs=None if support_ids is None else t_lp.gather(1, support_ids).numpy().astype(np.float32),
        )
        out.append(ScoredSample(rollout, scores))
    return out


@pytest.fixture(scope="module")
def generated(models: tuple[Path, Path]) -> Generated:
    return generate(load(models[0]), load(models[1]), n=16)


@torch.no_grad()
def dense_kl(student: Qwen3ForCausalLM, teacher: Qwen3ForCausalLM, samples: list[ScoredSample], forward: bool) -> float:
    batch = collate(samples, "forward_kl_full")
    s, t = response_logits(student, batch), response_logits(teacher, batch)
    kl = forward_kl_full(s, t) if forward else reverse_kl_full(s, t)
    return float(kl[batch.valid].mean())


CASES = [
    ("forward_kl_topk", {"tail": "bucket"}, 1),
    ("reverse_kl_topk", {"tail": "bucket"}, 1),
    ("reverse_kl_mc", {"correction": "is"}, 1),
    ("reverse_kl_mc", {"correction": "is", "advantage": "rollout"}, 1),
    ("reverse_kl_mc", {"correction": "ppo_clip"}, 2),
    ("reverse_kl_mc", {"correction": "decoupled"}, 2),
    ("reverse_kl_mc", {"correction": "m2po"}, 1),
    ("forward_kl_full", {}, 1),
    ("reverse_kl_full", {}, 1),
]


@pytest.mark.parametrize(("kind", "options", "mini_batches"), CASES, ids=str)
def test_steps_reduce_the_kl(
    models: tuple[Path, Path], generated: Generated, kind: str, options: dict[str, str], mini_batches: int
) -> None:
    student, teacher = load(models[0]), load(models[1])
    samples = scored_samples(generated, kind)
    forward = kind.startswith("forward")
    before = dense_kl(student, teacher, samples, forward)
    trainer = Trainer(
        student,
        OPDLoss(kind, **options),  # type: ignore[arg-type]
        lr=5e-3,
        micro_batch_size=6,
        mini_batches=mini_batches,
        teacher=teacher if kind.endswith("_full") else None,
    )
    stats = []
    for _ in range(5):
        stats += trainer.train(samples)
    after = dense_kl(student, teacher, samples, forward)
    assert trainer.version == 5 * mini_batches == stats[-1].version
    assert after < 0.9 * before, (before, after)
    assert all(np.isfinite(s.grad_norm) and s.tokens == RESPONSE * s.samples for s in stats)
    if kind == "reverse_kl_mc":
        assert {"ratio_mean", "clipped_fraction", "masked_fraction"} <= set(stats[0].metrics)


def test_missing_support_is_named(generated: Generated) -> None:
    samples = scored_samples(generated, "forward_kl_topk")
    with pytest.raises(ValueError, match=r"sample 's0'.*support_kind"):
        collate(samples, "reverse_kl_mc")


def test_micro_batching_matches_one_batch(models: tuple[Path, Path], generated: Generated) -> None:
    """Gradient accumulation over micro-batches gives the same update as one big batch."""
    samples = scored_samples(generated, "reverse_kl_topk")[:5]
    weights = []
    for micro in (5, 2):
        student = load(models[0])
        Trainer(student, OPDLoss("reverse_kl_topk"), lr=5e-3, micro_batch_size=micro).train(samples)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-3, atol=1e-5)


class RecordingLoss(OPDLoss):
    """The real estimator, also keeping the inputs of every call (one per micro-batch)."""

    calls: list[tuple[torch.Tensor, torch.Tensor | None]]

    def __call__(self, inputs: LossInputs) -> LossOutputs:
        proximal = None if inputs.proximal_logprobs is None else inputs.proximal_logprobs.detach().clone()
        self.calls.append((inputs.student_logits.detach().clone(), proximal))
        return super().__call__(inputs)


def test_decoupled_proximal_is_the_snapshot_before_the_first_step_sliced_per_micro_batch(
    models: tuple[Path, Path], generated: Generated
) -> None:
    """Decoupled PPO: every micro-batch of every mini-batch step gets, as its proximal log-probs,
    its own rows of one snapshot of the student taken before the batch's first optimizer step —
    not a fresh forward pass after earlier steps, not another micro-batch's rows."""
    samples = scored_samples(generated, "reverse_kl_mc")[:7]
    student = load(models[0])
    snapshot = load(models[0])  # the same weights, never stepped
    batch = collate(samples, "reverse_kl_mc")
    assert batch.ids is not None
    with torch.no_grad():
        expected = gather_logprobs(response_logits(snapshot, batch), batch.ids).float()
    loss = RecordingLoss("reverse_kl_mc", correction="decoupled")
    loss.calls = []
    # 7 samples, 2 mini-batches (rows 0-3 and 4-6), micro-batches of 2: rows 0-1, 2-3, 4-5, 6
    trainer = Trainer(student, loss, lr=5e-2, micro_batch_size=2, mini_batches=2)
    stats = trainer.train(samples)
    assert len(stats) == 2 and [s.samples for s in stats] == [4, 3]
    rows = [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert len(loss.calls) == len(rows)
    for (lo, hi), (_, proximal) in zip(rows, loss.calls, strict=True):
        assert proximal is not None and proximal.shape == expected[lo:hi].shape
        torch.testing.assert_close(proximal, expected[lo:hi], rtol=1e-4, atol=1e-5)
    # The second mini-batch ran on stepped weights: its current log-probs have moved away from
    # the snapshot, so a proximal recomputed after the first step would differ from it.
    now = gather_logprobs(loss.calls[2][0].float(), batch.ids[4:6])
    assert (now - expected[4:6]).abs().max() > 1e-3, "the first step did not move the student"
