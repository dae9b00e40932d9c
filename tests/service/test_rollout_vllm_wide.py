"""The vLLM engine at Qwen3's vocabulary size (151,936): MC draws and top-K made inside the
engine, checked against a transformers teacher-forced recomputation and a chi-square test, and
the bytes per generated token the engine hands to the host.

The model is a tiny random Qwen3 (hidden 64, one layer) built in a tmp dir; only the vocabulary
is real-size, which is what the in-engine sampler's cost and correctness depend on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from asyncopd.models.loading import load_tokenizer
from asyncopd.records import SupportKind
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.vllm_engine import VLLMEngine, vllm_available
from draw_checks import binned_chi_square, pooled_p
from rollout_checks import assert_matches_recomputation, recomputed_logmu, toy_prompts
from transformers import AutoModelForCausalLM, PreTrainedModel
from wide_models import QWEN3_VOCAB, make_wide_qwen3

if not vllm_available() and not os.environ.get("CI"):
    pytest.skip("vllm(-cpu) is not installed (CI installs it and runs these tests)", allow_module_level=True)

pytestmark = [pytest.mark.service, pytest.mark.vllm]


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wide_qwen3(tmp_path_factory.mktemp("wide") / "student")


@pytest.fixture(scope="module")
def engine(wide_dir: Path) -> Iterator[VLLMEngine]:
    eng = VLLMEngine(str(wide_dir), "wide-0", max_model_len=64, seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model(wide_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(wide_dir).eval()


def test_the_engine_serves_the_real_vocabulary(engine: VLLMEngine) -> None:
    assert engine.info.vocab_size == QWEN3_VOCAB


@pytest.mark.parametrize(("kind", "k"), [(SupportKind.MC_SAMPLES, 64), (SupportKind.STUDENT_TOPK, 64)])
def test_support_matches_teacher_forced_recomputation(
    engine: VLLMEngine, model: PreTrainedModel, wide_dir: Path, kind: SupportKind, k: int
) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.9, max_tokens=6, seed=5)
    prompts = toy_prompts(load_tokenizer(str(wide_dir)))[:2]
    before = engine.host_bytes
    rollouts = engine.generate(prompts, sampling, kind, k)
    assert_matches_recomputation(model, rollouts, sampling, kind, k, atol=5e-4)
    tokens = sum(r.num_tokens for r in rollouts)
    # ids (int32) and log μ (float32) of the support, the token and its log μ: nothing of size V.
    assert (engine.host_bytes - before) / tokens == k * 8 + 8
    # μ here is spread over thousands of ids: the support is not a handful of the 32 toy ids.
    assert rollouts[0].support_ids is not None and int(rollouts[0].support_ids.max()) >= 32


def test_mc_draws_follow_mu_at_the_real_vocabulary(engine: VLLMEngine, model: PreTrainedModel, wide_dir: Path) -> None:
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=4, seed=13)
    n = 4096
    (rollout,) = engine.generate(toy_prompts(load_tokenizer(str(wide_dir)))[:1], sampling, SupportKind.MC_SAMPLES, n)
    logmu = recomputed_logmu(model, rollout, sampling).numpy()
    wrong = recomputed_logmu(model, rollout, Sampling()).numpy()
    assert rollout.support_ids is not None
    stats, control = [], []
    for t in range(rollout.num_tokens):
        draws = rollout.support_ids[t, 1:].astype(np.int64)
        assert np.isfinite(logmu[t, draws]).all(), "no draw outside the nucleus"
        stats.append(binned_chi_square(draws, logmu[t], bins=64))
        control.append(binned_chi_square(draws, wrong[t], bins=64))
    assert pooled_p(stats) > 1e-3, stats
    assert pooled_p(control) < 1e-6, "the test can tell the model softmax from μ"


def test_bad_support_requests_are_refused_and_the_engine_keeps_serving(engine: VLLMEngine, wide_dir: Path) -> None:
    prompts = toy_prompts(load_tokenizer(str(wide_dir)))[:1]
    with pytest.raises(ValueError, match="support_k"):
        engine.generate(prompts, Sampling(), SupportKind.MC_SAMPLES, 0)
    with pytest.raises(ValueError, match="support_k"):
        engine.generate(prompts, Sampling(), SupportKind.STUDENT_TOPK, QWEN3_VOCAB + 1)
    (rollout,) = engine.generate(prompts, Sampling(greedy=True, max_tokens=3), SupportKind.MC_SAMPLES, 8)
    assert rollout.support_ids is not None
    assert (rollout.support_ids == rollout.response_ids[:, None]).all(), "greedy μ is the point mass"
    assert (rollout.support_logprobs == 0).all() and (rollout.behavior_logprobs == 0).all()
    with torch.no_grad():
        pass
