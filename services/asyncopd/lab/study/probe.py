"""Part 3a of the study: draws of sparse and Monte-Carlo reverse-KL gradients on fixed rollouts.

On one fixed batch of student rollouts (vocabulary 32, so the dense reverse-KL gradient is
exact and cheap) every estimator's gradient w.r.t. the student's parameters is drawn R times:
each draw re-samples the estimator's per-position support from the behaviour distribution μ at
the same states (`rollout.sampling.draw_support`: y_1 ~ μ, then N − 1 i.i.d. draws; or the
deterministic student top-K), has the teacher score it (`TeacherScorer`), and differentiates
the real `OPDLoss` on it. `gradients.gradient_stats` then compares the draws with the dense
`reverse_kl_full` gradient.

`draw_gradients` is the model-free core (scorer and gradient passed in), so a test can run it
on a linear-softmax model whose gradient is written by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from asyncopd.config import RunConfig
from asyncopd.lab.study.gradients import GradientStats, flat_gradient, gradient_stats
from asyncopd.lab.study.harness import StalenessHarness, StudyModels
from asyncopd.learner.batching import collate
from asyncopd.learner.trainer import loss_from_config, response_logits
from asyncopd.opd import LossInputs, OPDLoss
from asyncopd.records import Rollout, SupportKind
from asyncopd.rollout.sampling import behaviour_logprobs, draw_support, sample
from asyncopd.teacher.scorer import TeacherScorer

# ids [P, K] -> teacher log-probs at those ids [P, K]
SupportScorer = Callable[[Tensor], Tensor]
# (loss, ids [P, K], teacher log-probs [P, K], behaviour log-probs [P, K]) -> flat gradient [D]
GradientOf = Callable[[OPDLoss, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator of the probe: a label and the loss-section overrides that select it."""

    label: str
    kind: str  # reverse_kl_topk | reverse_kl_mc
    k: int


def support_kind_of(kind: str) -> SupportKind:
    if kind == "reverse_kl_topk":
        return SupportKind.STUDENT_TOPK
    if kind == "reverse_kl_mc":
        return SupportKind.MC_SAMPLES
    raise ValueError(f"the probe draws sparse or MC reverse-KL estimators, not {kind!r}")


def draw_gradients(
    loss: OPDLoss,
    gradient_of: GradientOf,
    logmu: Tensor,
    *,
    kind: SupportKind,
    k: int,
    draws: int,
    score: SupportScorer,
    generator: torch.Generator,
) -> Tensor:
    """`draws` gradients [R, D] of `loss`, each on a fresh support drawn from μ at every position.

    `logmu` [P, V] is log μ at the P positions. A top-K support is deterministic, so one draw
    is taken for it whatever `draws` says.
    """
    rounds = 1 if kind == SupportKind.STUDENT_TOPK else draws
    out = []
    for _ in range(rounds):
        ids, behaviour = _support(logmu, kind, k, generator)
        out.append(gradient_of(loss, ids, score(ids), behaviour))
    return torch.stack(out)


def _support(logmu: Tensor, kind: SupportKind, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One support draw. N MC draws are taken as chunks of at most |V| columns, each a fresh
    `draw_support` (its first column a fresh y ~ μ): N i.i.d. draws from μ, as one `draw_support`
    of N (with replacement) would give; the chunking is kept so the committed probe figures
    reproduce draw for draw."""
    vocab = logmu.shape[-1]
    chunks = [k] if kind == SupportKind.STUDENT_TOPK else [min(vocab, k - lo) for lo in range(0, k, vocab)]
    ids, behaviour = [], []
    for width in chunks:
        support = draw_support(logmu, sample(logmu, generator), kind, width, generator)
        assert support is not None
        ids.append(support[0])
        behaviour.append(support[1])
    return torch.cat(ids, -1), torch.cat(behaviour, -1)


def teacher_support_scorer(scorer: TeacherScorer, rollouts: Sequence[Rollout], kind: SupportKind) -> SupportScorer:
    """Score ids [P, K] (the rollouts' response positions, in order) with the pipeline's teacher."""
    lengths = [r.num_tokens for r in rollouts]

    def score(ids: Tensor) -> Tensor:
        if ids.shape[0] != sum(lengths):
            raise ValueError(f"{ids.shape[0]} positions, the rollouts hold {sum(lengths)}")
        parts = np.split(ids.cpu().numpy().astype(np.int32), np.cumsum(lengths)[:-1])
        supported = [
            dataclasses.replace(r, support_kind=kind, support_ids=part) for r, part in zip(rollouts, parts, strict=True)
        ]
        scores = scorer.score(supported, topk=0, tail=False)
        return torch.from_numpy(np.concatenate([s.support_logprobs for s in scores if s.support_logprobs is not None]))

    return score


def probe_gradients(
    config: RunConfig,
    shared: StudyModels,
    estimators: Sequence[EstimatorSpec],
    draws: int,
) -> dict[str, GradientStats]:
    """Stats of each estimator's gradient on one batch of the config's student rollouts (seed = config.seed).

    The batch is generated by the initial student (version 0) and μ is that student, so the
    probe measures the estimators themselves, without staleness. The MC estimators use the
    config's advantage/correction (the study sets recompute + is, the MC-correctable one).
    """
    harness = StalenessHarness(config, 0, shared)
    model = harness.trainer.model
    rollouts = harness.engine.generate(harness.prompts(0), harness.sampling_for(0), SupportKind.NONE, 0)
    batch = collate(harness.score(rollouts), "reverse_kl_full", harness.pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    logits = response_logits(model, batch)[batch.valid]  # [P, V] with gradient
    with torch.no_grad():
        teacher_logits = response_logits(shared.teacher, batch)[batch.valid]
    valid = torch.ones(logits.shape[0], dtype=torch.bool)
    dense_loss = OPDLoss("reverse_kl_full")(LossInputs(logits, valid, teacher_logits=teacher_logits)).loss
    dense = flat_gradient(dense_loss, params, retain_graph=True)
    logmu = behaviour_logprobs(logits.detach(), harness.sampling)

    def gradient_of(loss: OPDLoss, ids: Tensor, teacher_lp: Tensor, behaviour_lp: Tensor) -> Tensor:
        inputs = LossInputs(logits, valid, ids=ids, teacher_logprobs=teacher_lp, behavior_logprobs=behaviour_lp)
        return flat_gradient(loss(inputs).loss, params, retain_graph=True)

    generator = torch.Generator().manual_seed(10_007 + config.seed)
    out: dict[str, GradientStats] = {}
    for spec in estimators:
        kind = support_kind_of(spec.kind)
        score = teacher_support_scorer(shared.scorer, rollouts, kind)
        grads = draw_gradients(
            loss_from_config(config.loss, spec.kind),  # type: ignore[arg-type]
            gradient_of,
            logmu,
            kind=kind,
            k=spec.k,
            draws=draws,
            score=score,
            generator=generator,
        )
        out[spec.label] = gradient_stats(grads, dense)
    return out
