"""Shared checks of rollouts against a teacher-forced recomputation by the transformers model.

Used by the transformers and the vLLM engine tests: whatever the engine, the recorded
behaviour log-probs and support must be log μ of the same tokens recomputed from scratch.
"""

from __future__ import annotations

import numpy as np
import torch
from asyncopd.records import Prompt, Rollout, SupportKind, TaskInfo
from asyncopd.rollout.sampling import Sampling, behaviour_logprobs
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOY_PROMPTS = ("Q:8+8-4-6=? A:", "Q:(2-1)*1*6=? A:", "Q:3*3=? A:", "Q:9-2+1=? A:")


def toy_prompts(tokenizer: PreTrainedTokenizerBase, texts: tuple[str, ...] = TOY_PROMPTS) -> list[Prompt]:
    return [
        Prompt(
            prompt_id=f"p{i}",
            prompt_ids=np.asarray(tokenizer.encode(t), dtype=np.int32),
            task=TaskInfo("toy", "0", t),
            ticket=f"ticket-{i}",
        )
        for i, t in enumerate(texts)
    ]


def recomputed_logmu(model: PreTrainedModel, rollout: Rollout, sampling: Sampling) -> torch.Tensor:
    """[T, V] log μ at each response position, from one teacher-forced forward pass."""
    full = np.concatenate([rollout.prompt_ids, rollout.response_ids]).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(full)[None]).logits[0]
    p = len(rollout.prompt_ids)
    return behaviour_logprobs(logits[p - 1 : -1], sampling)


def assert_matches_recomputation(
    model: PreTrainedModel,
    rollouts: list[Rollout],
    sampling: Sampling,
    kind: SupportKind,
    k: int,
    *,
    atol: float = 2e-4,
) -> None:
    for r in rollouts:
        t = r.num_tokens
        assert t >= 1 and r.versions.shape == (t,) and r.behavior_logprobs.shape == (t,)
        logmu = recomputed_logmu(model, r, sampling)
        response = torch.from_numpy(r.response_ids.astype(np.int64))
        want = logmu.gather(-1, response[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(r.behavior_logprobs, want, atol=atol, rtol=0)
        assert np.isfinite(r.behavior_logprobs).all(), "a sampled token always has mass under μ"
        if kind == SupportKind.NONE:
            assert r.support_ids is None and r.support_logprobs is None
            continue
        assert r.support_kind == kind
        assert r.support_ids is not None and r.support_logprobs is not None
        assert r.support_ids.shape == (t, k)
        ids = torch.from_numpy(r.support_ids.astype(np.int64))
        at_ids = logmu.gather(-1, ids).numpy()
        finite = np.isfinite(at_ids)
        assert (finite == np.isfinite(r.support_logprobs)).all()
        np.testing.assert_allclose(r.support_logprobs[finite], at_ids[finite], atol=atol, rtol=0)
        if kind == SupportKind.STUDENT_TOPK:
            # The ids are the true top-K: their recomputed values are the K largest of μ.
            top_values = logmu.topk(k, dim=-1).values.numpy()
            got_sorted = -np.sort(-at_ids, axis=-1)
            both_finite = np.isfinite(top_values)
            np.testing.assert_allclose(got_sorted[both_finite], top_values[both_finite], atol=atol, rtol=0)
            assert (np.isfinite(got_sorted) == both_finite).all()
            assert all(len(set(row)) == k for row in r.support_ids.tolist()), "top-K ids are distinct"
        else:
            np.testing.assert_array_equal(r.support_ids[:, 0], r.response_ids)
            assert finite.all(), "MC draws come from μ, never from outside its support"
