"""The study's dense held-out divergence (`lab/study/held_out.py`) against naive formulas.

- `chunk_stats`: KL(π‖p) per position equals Σ_v π(v)[log π(v) − log p(v)] computed in fp64 from
  the whole logits, whatever the chunk size (1, uneven, larger than the positions); it is 0 for
  student = teacher; a top-k's missing mass equals 1 − the sum of the k largest probabilities,
  0 at k = |V|;
- `held_out_stats` on two tiny Qwen3 models: the token mean over response positions only equals
  the naive formula on `model(ids).logits` (prompt positions excluded, one position shifted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asyncopd.lab.study.held_out import chunk_stats, held_out_stats, topk_missing_mass
from asyncopd.opd.head import ProjectedLogits
from asyncopd.records import Rollout, TaskInfo
from transformers import Qwen3Config, Qwen3ForCausalLM

pytestmark = pytest.mark.unit


def _naive_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_pi = torch.log_softmax(student.double(), dim=-1)
    log_p = torch.log_softmax(teacher.double(), dim=-1)
    return (log_pi.exp() * (log_pi - log_p)).sum(-1)


def _naive_missing(logits: torch.Tensor, k: int) -> torch.Tensor:
    probs = torch.softmax(logits.double(), dim=-1)
    return 1.0 - probs.sort(dim=-1, descending=True).values[..., :k].sum(-1)


def _projected(positions: int, hidden: int, vocab: int, seed: int, scale: float = 1.0) -> ProjectedLogits:
    g = torch.Generator().manual_seed(seed)
    return ProjectedLogits(
        torch.randn(positions, hidden, generator=g) * scale,
        torch.randn(vocab, hidden, generator=g),
        torch.randn(vocab, generator=g),
    )


@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
def test_chunked_kl_and_missing_mass_equal_the_naive_formulas(chunk: int) -> None:
    student, teacher = _projected(37, 16, 3000, 0), _projected(37, 16, 3000, 1, scale=0.5)
    stats = chunk_stats(student, teacher, ks=(1, 8, 64), chunk_positions=chunk)
    s_full, t_full = student.materialize(), teacher.materialize()
    torch.testing.assert_close(stats.reverse_kl.double(), _naive_kl(s_full, t_full), rtol=1e-4, atol=1e-5)
    assert float(stats.reverse_kl.min()) > 0.1  # different models: a real divergence, not ~0
    for k in (1, 8, 64):
        torch.testing.assert_close(stats.student_missing[k].double(), _naive_missing(s_full, k), rtol=0, atol=1e-5)
        torch.testing.assert_close(stats.teacher_missing[k].double(), _naive_missing(t_full, k), rtol=0, atol=1e-5)
    # more of the list, less missing
    assert bool((stats.student_missing[64] <= stats.student_missing[8]).all())


def test_kl_is_zero_for_the_teacher_itself_and_full_topk_misses_nothing() -> None:
    teacher = _projected(20, 8, 500, 3)
    stats = chunk_stats(teacher, teacher, ks=(500,), chunk_positions=6)
    assert float(stats.reverse_kl.abs().max()) < 1e-5
    assert float(stats.teacher_missing[500].abs().max()) < 1e-5
    with pytest.raises(ValueError, match="k must be in"):
        topk_missing_mass(torch.zeros(3, 10), 11)


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="!="):
        chunk_stats(_projected(4, 8, 100, 0), _projected(4, 8, 101, 1))


def _tiny_qwen3(seed: int, hidden: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=700,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


def _rollout(prompt: list[int], response: list[int]) -> Rollout:
    n = len(response)
    return Rollout(
        sample_id=f"s{len(prompt)}",
        prompt_id="p",
        ticket="",
        task=TaskInfo("toy", ""),
        prompt_ids=np.array(prompt, dtype=np.int32),
        response_ids=np.array(response, dtype=np.int32),
        behavior_logprobs=np.zeros(n, dtype=np.float32),
        versions=np.zeros(n, dtype=np.int32),
    )


def test_held_out_stats_average_kl_over_response_positions_only() -> None:
    student, teacher = _tiny_qwen3(0, 32), _tiny_qwen3(1, 64)
    rng = np.random.default_rng(0)
    sequences = [
        _rollout(rng.integers(0, 700, 5).tolist(), rng.integers(0, 700, 11).tolist()),
        _rollout(rng.integers(0, 700, 3).tolist(), rng.integers(0, 700, 1).tolist()),
    ]
    got = held_out_stats(student, teacher, sequences, ks=(8,), chunk_positions=4)

    kl, miss, positions = [], [], 0
    with torch.no_grad():
        for r in sequences:
            ids = torch.tensor(np.concatenate([r.prompt_ids, r.response_ids]), dtype=torch.long)[None]
            start = len(r.prompt_ids)
            s_logits = student(input_ids=ids).logits[0, start - 1 : -1]
            t_logits = teacher(input_ids=ids).logits[0, start - 1 : -1]
            kl.append(_naive_kl(s_logits, t_logits))
            miss.append(_naive_missing(t_logits, 8))
            positions += r.num_tokens
    assert got["positions"] == positions == 12
    assert got["reverse_kl"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-4)
    assert got["teacher_top8_missing"] == pytest.approx(float(torch.cat(miss).mean()), abs=1e-5)
    assert got["reverse_kl"] > 0.01
    same = held_out_stats(teacher, teacher, sequences)
    assert abs(same["reverse_kl"]) < 1e-5
