"""The learner's memory settings change memory, not the update: chunked LM head, sequence
packing, activation checkpointing and bf16 autocast against the plain path, on tiny Qwen3s.

Exactness checks run the model in float64 (`param_dtype`), so that "same loss and gradients"
can be asserted to 1e-9 instead of to fp32 noise; bf16 is checked for dtypes and closeness.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from asyncopd.learner.batching import collate
from asyncopd.learner.trainer import Trainer, response_hidden
from asyncopd.opd import OPDLoss
from asyncopd.records import ScoredSample
from test_learner_step import Generated, generate, load, scored_samples
from tiny_models import make_tiny_qwen3
from transformers import Qwen3ForCausalLM

pytestmark = pytest.mark.service

F64 = torch.float64


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_tiny_qwen3(root / "student", seed=3), make_tiny_qwen3(root / "teacher", seed=4, scale=4.0)


@pytest.fixture(scope="module")
def generated(models: tuple[Path, Path]) -> Generated:
    return generate(load(models[0]), load(models[1]), n=6, seed=1)


def ragged(samples: list[ScoredSample]) -> list[ScoredSample]:
    """The samples with prompts and responses cut to different lengths (so rows need padding)."""
    out = []
    for i, s in enumerate(samples):
        cut_prompt, keep = i % 3, 8 - (i * 3) % 7  # prompts 5/4/3 tokens, responses 8..2 tokens
        r, sc = s.rollout, s.scores

        def head(a: Any, keep: int = keep) -> Any:
            return None if a is None else a[:keep]

        rollout = dataclasses.replace(
            r,
            prompt_ids=r.prompt_ids[cut_prompt:],
            response_ids=r.response_ids[:keep],
            behavior_logprobs=r.behavior_logprobs[:keep],
            versions=r.versions[:keep],
            support_ids=head(r.support_ids),
            support_logprobs=head(r.support_logprobs),
        )
        scores = dataclasses.replace(
            sc,
            token_logprobs=sc.token_logprobs[:keep],
            topk_ids=head(sc.topk_ids),
            topk_logprobs=head(sc.topk_logprobs),
            support_logprobs=head(sc.support_logprobs),
        )
        out.append(ScoredSample(rollout, scores))
    return out


def one_update(
    models: tuple[Path, Path], samples: list[ScoredSample], kind: str, options: dict[str, Any], **settings: Any
) -> tuple[list[float], list[torch.Tensor], Trainer]:
    """Losses of a `train` call and the (clipped) gradients of its last step, in float64."""
    student = load(models[0])
    teacher = load(models[1]).to(F64) if kind.endswith("_full") else None
    trainer = Trainer(
        student,
        OPDLoss(kind, **options),  # type: ignore[arg-type]
        lr=1e-2,
        teacher=teacher,
        param_dtype=settings.pop("param_dtype", F64),
        **settings,
    )
    stats = trainer.train(samples)
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    return [s.metrics["loss"] for s in stats], grads, trainer


CASES = [
    ("forward_kl_topk", {"tail": "renorm"}),
    ("forward_kl_topk", {"tail": "bucket"}),
    ("reverse_kl_topk", {"tail": "bucket"}),
    ("reverse_kl_mc", {"correction": "is"}),
    ("reverse_kl_mc", {"correction": "decoupled"}),
    ("reverse_kl_mc", {"correction": "ppo_clip", "advantage": "rollout"}),
    ("reverse_kl_mc", {"correction": "m2po"}),
    ("forward_kl_full", {}),
    ("reverse_kl_full", {}),
]


def assert_same(
    a: tuple[list[float], list[torch.Tensor], Trainer], b: tuple[list[float], list[torch.Tensor], Trainer]
) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-9, abs=1e-12)
    assert len(a[1]) == len(b[1]) > 0
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize(("kind", "options"), CASES, ids=str)
def test_a_chunked_lm_head_gives_the_same_losses_and_gradients(
    models: tuple[Path, Path], generated: Generated, kind: str, options: dict[str, Any]
) -> None:
    """Two mini-batches (so decoupled's proximal snapshot differs from the current student on the
    second), micro-batches of 2 rows, LM-head chunks of 3 positions."""
    samples = ragged(scored_samples(generated, kind))
    common = {"micro_batch_size": 2, "mini_batches": 2}
    plain = one_update(models, samples, kind, options, **common)
    chunked = one_update(models, samples, kind, options, logit_chunk_tokens=3, **common)
    assert_same(chunked, plain)


def test_packed_rows_see_only_themselves(models: tuple[Path, Path], generated: Generated) -> None:
    """A packed row's hidden states at response positions equal the padded rows' (the position
    ids restart per row and attention stays inside a row)."""
    samples = ragged(scored_samples(generated, "reverse_kl_mc"))
    model = load(models[0]).to(F64)
    batch = collate(samples, "reverse_kl_mc")
    with torch.no_grad():
        padded = response_hidden(model, batch)[batch.valid]
        packed = response_hidden(model, batch.pack())[0]
    assert batch.pack().input_ids.shape == (1, sum(batch.lengths())) and sum(batch.lengths()) < batch.input_ids.numel()
    torch.testing.assert_close(packed, padded, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("kind", "options"), [("reverse_kl_mc", {"correction": "decoupled"}), ("forward_kl_full", {})], ids=str
)
def test_packing_under_a_token_budget_gives_the_same_update(
    models: tuple[Path, Path], generated: Generated, kind: str, options: dict[str, Any]
) -> None:
    """Token budget + packing vs padded rows, and a chunked head on top: same losses and gradients
    (every micro-batch plan holds whole mini-batches here, so M2PO-style global masks agree)."""
    samples = ragged(scored_samples(generated, kind))
    plain = one_update(models, samples, kind, options, micro_batch_size=6, mini_batches=2)
    packed = one_update(
        models, samples, kind, options, mini_batches=2, max_tokens_per_micro_batch=64, pack_sequences=True
    )
    both = one_update(
        models,
        samples,
        kind,
        options,
        mini_batches=2,
        max_tokens_per_micro_batch=64,
        pack_sequences=True,
        logit_chunk_tokens=4,
    )
    assert packed[2].micro_batches(collate(samples, kind), 0, 3) == [(0, 3)]
    assert_same(packed, plain)
    assert_same(both, plain)


def test_a_small_budget_splits_rows_and_keeps_the_update(models: tuple[Path, Path], generated: Generated) -> None:
    samples = ragged(scored_samples(generated, "reverse_kl_topk"))
    plain = one_update(models, samples, "reverse_kl_topk", {}, micro_batch_size=6)
    budget = one_update(models, samples, "reverse_kl_topk", {}, max_tokens_per_micro_batch=20)
    plan = budget[2].micro_batches(collate(samples, "reverse_kl_topk"), 0, len(samples))
    assert len(plan) > 2, plan
    assert_same(budget, plain)


def test_activation_checkpointing_gives_the_same_update(models: tuple[Path, Path], generated: Generated) -> None:
    samples = ragged(scored_samples(generated, "reverse_kl_mc"))
    plain = one_update(models, samples, "reverse_kl_mc", {}, micro_batch_size=3)
    checkpointed = one_update(models, samples, "reverse_kl_mc", {}, micro_batch_size=3, activation_checkpointing=True)
    model = checkpointed[2].model
    assert isinstance(model, Qwen3ForCausalLM) and model.is_gradient_checkpointing
    assert_same(checkpointed, plain)


def test_bf16_compute_keeps_fp32_masters_and_optimizer_state(models: tuple[Path, Path], generated: Generated) -> None:
    samples = scored_samples(generated, "reverse_kl_mc")
    fp32 = one_update(models, samples, "reverse_kl_mc", {}, param_dtype=torch.float32)
    mixed = one_update(models, samples, "reverse_kl_mc", {}, param_dtype=torch.float32, compute_dtype=torch.bfloat16)
    chunked = one_update(
        models,
        samples,
        "reverse_kl_mc",
        {},
        param_dtype=torch.float32,
        compute_dtype=torch.bfloat16,
        logit_chunk_tokens=5,
    )
    for _, grads, trainer in (mixed, chunked):
        assert trainer.autocast_dtype == torch.bfloat16
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
        assert {g.dtype for g in grads} == {torch.float32}
        state = [s for s in trainer.optimizer.state.values()]
        assert state and {s["exp_avg"].dtype for s in state} == {s["exp_avg_sq"].dtype for s in state} == {
            torch.float32
        }
    # bf16 matmuls: the same loss to bf16 precision, not bit for bit
    assert mixed[0] == pytest.approx(fp32[0], rel=5e-2, abs=5e-3)
    assert chunked[0] == pytest.approx(mixed[0], rel=1e-2, abs=1e-3)
    assert mixed[0] != fp32[0], "autocast did not change the compute dtype"


def test_pure_bf16_and_bad_dtype_combinations(models: tuple[Path, Path]) -> None:
    student = load(models[0])
    trainer = Trainer(student, OPDLoss("reverse_kl_mc"), lr=1e-3, param_dtype=torch.bfloat16)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16} and trainer.autocast_dtype is None
    with pytest.raises(ValueError, match=r"learner\.compute_dtype"):
        Trainer(
            load(models[0]), OPDLoss("reverse_kl_mc"), lr=1e-3, param_dtype=torch.bfloat16, compute_dtype=torch.float32
        )
    with pytest.raises(ValueError, match=r"learner\.compute_dtype"):
        Trainer(load(models[0]).to(torch.bfloat16), OPDLoss("reverse_kl_mc"), lr=1e-3, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"learner\.pack_sequences"):
        Trainer(load(models[0]), OPDLoss("reverse_kl_mc"), lr=1e-3, pack_sequences=True)
