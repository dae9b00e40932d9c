"""Dense held-out divergence of a student from the teacher, over the full vocabulary.

The study's accuracy says little in the wide world (a 200-choice walk is rarely perfect), so
every cell also reports KL(π‖p) = Σ_v π(v)[log π(v) − log p(v)] — the divergence reverse-KL
OPD minimises — per response position of a fixed held-out set, token mean. The held-out set
is the teacher's own sampled responses (the run's sampling, seeded, the project's `TransformersEngine`)
to the task's test prompts: the same sequences for every cell of a config, so two cells'
numbers differ only by their students.

At 151,936 rows a [positions, V] fp32 block is 600 KB a position, so nothing here builds the
whole tensor: the decoders give hidden states [T, H] and `chunk_stats` projects them through
each model's LM head `chunk_positions` positions at a time (the project's `ProjectedLogits`),
keeping only per-position numbers. The same pass measures how much mass each model's top-K
misses (1 − Σ of its K largest probabilities): the bias a sparse top-K cache cannot see.

`chunk_stats` is the pure part (tensors in, tensors out); `held_out_stats` runs the models.
It knows models and the opd kernels; nothing of configs, the plan or the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from asyncopd.opd.head import ProjectedLogits
from asyncopd.opd.vocab import dense_reverse_kl
from asyncopd.records import Prompt, Rollout, SupportKind
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.transformers_engine import TransformersEngine

CHUNK_POSITIONS = 64
"""Positions projected at once: [64, 151,936] fp32 is 39 MB a model."""


@dataclass(frozen=True)
class ChunkStats:
    """Per-position numbers of one sequence (or any set of positions): [P] each."""

    reverse_kl: Tensor
    student_missing: dict[int, Tensor]
    teacher_missing: dict[int, Tensor]


def topk_missing_mass(logprobs: Tensor, k: int) -> Tensor:
    """1 − (sum of the k largest probabilities): log-probs [..., V] -> [...]."""
    if not 1 <= k <= logprobs.shape[-1]:
        raise ValueError(f"k must be in 1..{logprobs.shape[-1]}, got {k}")
    top = logprobs.topk(k, dim=-1).values
    return (1.0 - torch.logsumexp(top, dim=-1).exp()).clamp(min=0.0)


@torch.no_grad()
def chunk_stats(
    student: ProjectedLogits, teacher: ProjectedLogits, ks: Sequence[int] = (), chunk_positions: int = CHUNK_POSITIONS
) -> ChunkStats:
    """KL(π‖p) and each model's top-k missing mass at every position, `chunk_positions` at a time.

    student, teacher: projected logits with the same leading shape [..., V]; returns [P] tensors
    (P = the leading positions, flattened), fp32.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} != teacher logits {tuple(teacher.shape)}")
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    positions = student.hidden.shape[:-1].numel()
    kl: list[Tensor] = []
    s_miss: dict[int, list[Tensor]] = {k: [] for k in ks}
    t_miss: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, positions, chunk_positions):
        stop = min(start + chunk_positions, positions)
        z_s = student.chunk(start, stop).materialize().float()
        z_t = teacher.chunk(start, stop).materialize().float()
        kl.append(dense_reverse_kl(z_s, z_t))
        if ks:
            log_pi, log_p = torch.log_softmax(z_s, dim=-1), torch.log_softmax(z_t, dim=-1)
            for k in ks:
                s_miss[k].append(topk_missing_mass(log_pi, k))
                t_miss[k].append(topk_missing_mass(log_p, k))
        del z_s, z_t
    empty = torch.zeros(0)
    return ChunkStats(
        torch.cat(kl) if kl else empty,
        {k: torch.cat(v) if v else empty for k, v in s_miss.items()},
        {k: torch.cat(v) if v else empty for k, v in t_miss.items()},
    )


def _head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        raise ValueError(f"held-out KL needs an nn.Linear LM head, got {type(head).__name__}")
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"held-out KL needs logits = lm_head(hidden); the model sets {attr}")
    return head


def _projected(model: nn.Module, ids: Tensor, start: int) -> ProjectedLogits:
    """The logits predicting ids[start:], as the decoder's hidden states and the LM head."""
    decoder = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    head = _head(model)
    return ProjectedLogits(hidden[start - 1 : ids.shape[0] - 1], head.weight, head.bias)


@torch.no_grad()
def held_out_stats(
    student: nn.Module,
    teacher: nn.Module,
    sequences: Sequence[Rollout],
    ks: Sequence[int] = (),
    chunk_positions: int = CHUNK_POSITIONS,
) -> dict[str, float]:
    """Token means over the response positions of `sequences`: `reverse_kl` = KL(π‖p), and
    `student_top{k}_missing` / `teacher_top{k}_missing` for each k; `positions` = their count."""
    if not sequences:
        raise ValueError("held-out KL needs at least one sequence")
    was = student.training
    student.eval()
    totals: dict[str, float] = {"reverse_kl": 0.0}
    positions = 0
    try:
        for r in sequences:
            ids = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64))
            device = next(student.parameters()).device
            start = len(r.prompt_ids)
            if start < 1 or r.num_tokens < 1:
                raise ValueError(f"held-out sequence {r.sample_id}: needs a prompt and a response")
            stats = chunk_stats(
                _projected(student, ids.to(device), start),
                _projected(teacher, ids.to(next(teacher.parameters()).device), start),
                ks,
                chunk_positions,
            )
            totals["reverse_kl"] += float(stats.reverse_kl.double().sum())
            for k in ks:
                for role, miss in (("student", stats.student_missing), ("teacher", stats.teacher_missing)):
                    name = f"{role}_top{k}_missing"
                    totals[name] = totals.get(name, 0.0) + float(miss[k].double().sum())
            positions += r.num_tokens
    finally:
        student.train(was)
    return {**{name: value / positions for name, value in totals.items()}, "positions": float(positions)}


def sample_held_out(engine: TransformersEngine, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
    """One sampled response per prompt from the engine's model (the teacher's, for the study)."""
    if not sampling.seed:
        raise ValueError("the held-out set must be reproducible: give the sampling a nonzero seed")
    return engine.generate(prompts, sampling, SupportKind.NONE, 0)
