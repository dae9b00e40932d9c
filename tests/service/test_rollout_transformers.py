"""The transformers rollout engine on the shipped toy student: behaviour log-probs, support,
MC draws, stopping, and per-token versions across a weight switch in mid-generation."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.records import SupportKind
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.transformers_engine import TransformersEngine
from rollout_checks import assert_matches_recomputation, recomputed_logmu, toy_prompts

pytestmark = pytest.mark.service

STUDENT = "assets/toy-student"


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    return TransformersEngine(load_model(STUDENT), load_tokenizer(STUDENT), "r0")


@pytest.mark.parametrize(
    ("kind", "k", "temperature", "top_p"),
    [
        (SupportKind.NONE, 0, 1.0, 1.0),
        (SupportKind.STUDENT_TOPK, 4, 0.7, 0.95),
        (SupportKind.MC_SAMPLES, 6, 1.5, 0.9),
    ],
)
def test_behaviour_logprobs_and_support_match_teacher_forced_recomputation(
    engine: TransformersEngine, kind: SupportKind, k: int, temperature: float, top_p: float
) -> None:
    sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=24, stop=("\n",), seed=7)
    tokenizer = load_tokenizer(STUDENT)
    rollouts = engine.generate(toy_prompts(tokenizer), sampling, kind, k)
    assert [r.prompt_id for r in rollouts] == ["p0", "p1", "p2", "p3"]
    assert all(r.ticket == f"ticket-{i}" and r.sample_id.startswith(r.ticket) for i, r in enumerate(rollouts))
    assert_matches_recomputation(engine._model, rollouts, sampling, kind, k)
    assert all((r.versions == 0).all() for r in rollouts)


def test_mc_draws_are_distributed_as_mu(engine: TransformersEngine) -> None:
    """Same prompt many times, first position only: all draws share one μ (chi-square test)."""
    tokenizer = load_tokenizer(STUDENT)
    prompts = toy_prompts(tokenizer, ("Q:1+",) * 64)
    sampling = Sampling(temperature=2.0, max_tokens=1, seed=11)
    rollouts = engine.generate(prompts, sampling, SupportKind.MC_SAMPLES, 32)
    logmu = recomputed_logmu(engine._model, rollouts[0], sampling)[0]
    probs = logmu.exp().double().numpy()
    draws = np.concatenate([r.support_ids[0, 1:] for r in rollouts])  # type: ignore[index]
    counts = np.bincount(draws, minlength=probs.shape[0]).astype(float)
    keep = probs * counts.sum() >= 5  # pool rare tokens so the chi-square approximation holds
    observed, expected = counts[keep], probs[keep] * counts.sum()
    if (~keep).any():
        observed = np.append(observed, counts[~keep].sum())
        expected = np.append(expected, probs[~keep].sum() * counts.sum())
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.shape[0] - 1
    assert dof >= 3, "the test needs a spread distribution"
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    assert z < 3.3, f"MC draws deviate from μ (chi-square {stat:.1f} on {dof} dof)"


def test_stops_at_eos_or_stop_string_and_flags_truncation(engine: TransformersEngine) -> None:
    tokenizer = load_tokenizer(STUDENT)
    eos = tokenizer.eos_token_id
    rollouts = engine.generate(toy_prompts(tokenizer), Sampling(greedy=True, max_tokens=40), SupportKind.NONE, 0)
    for r in rollouts:
        text = tokenizer.decode(r.response_ids.tolist())
        assert r.truncated == (r.response_ids[-1] != eos), text
        assert eos not in r.response_ids[:-1].tolist()
        assert (r.behavior_logprobs == 0).all(), "greedy μ is a point mass"
    short = engine.generate(toy_prompts(tokenizer), Sampling(greedy=True, max_tokens=2), SupportKind.NONE, 0)
    assert all(r.num_tokens <= 2 for r in short)
    stopped = engine.generate(
        toy_prompts(tokenizer), Sampling(temperature=1.0, max_tokens=30, stop=(":", "="), seed=3), SupportKind.NONE, 0
    )
    ended_by_stop = 0
    for r in stopped:
        text = tokenizer.decode(r.response_ids.tolist(), skip_special_tokens=False)
        hit = [i for i, c in enumerate(text) if c in ":="]
        if hit:
            assert hit[0] == len(text) - 1 and not r.truncated, "a stop string ends the response"
            ended_by_stop += 1
        else:
            assert r.truncated or r.response_ids[-1] == eos, f"ended without eos, stop string or max_tokens: {text!r}"
    # The check above must have run: at least one response met a stop string.
    assert ended_by_stop > 0, "no response hit ':' or '=': the stop-string check never ran"


def test_weight_switch_mid_generation_gives_per_token_versions() -> None:
    model = load_model(STUDENT)
    engine = TransformersEngine(model, load_tokenizer(STUDENT), "r1")
    new = {name: t.clone() * 0.5 for name, t in model.state_dict().items()}
    calls = {"n": 0}
    loader: list[threading.Thread] = []

    def hook(*_: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # after the prefill and three decode steps, from another thread
            loader.append(threading.Thread(target=engine.load_weights, args=(1, list(new.items()))))
            loader[0].start()

    handle = model.register_forward_hook(hook)
    try:
        sampling = Sampling(temperature=1.0, max_tokens=60, seed=5)
        prompts = toy_prompts(load_tokenizer(STUDENT))[:2]
        # EOS and stop strings could end it early: compare against the longest-running response.
        rollouts = engine.generate(prompts, sampling, SupportKind.NONE, 0)
    finally:
        handle.remove()
        for t in loader:
            t.join()
    assert engine.version == 1
    for r in rollouts:
        v = r.versions
        assert (np.diff(v) >= 0).all() and v[0] == 0, v
        assert v[:4].tolist() == [0] * min(4, len(v))
    longest = max(rollouts, key=lambda r: r.num_tokens)
    assert longest.num_tokens > 10 and longest.versions[-1] == 1, longest.versions
    assert all(torch.equal(model.state_dict()[n], t) for n, t in new.items()), "the new weights are in place"


def test_bad_weight_updates_change_nothing(engine: TransformersEngine) -> None:
    before = engine.version
    shapes = engine.param_shapes()
    name = next(iter(shapes))
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.load_weights(before + 1, [("nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights(before + 1, [(name, torch.zeros(3, 3, 3))])
    with pytest.raises(ValueError, match="older"):
        engine.load_weights(before - 1, [])
    assert engine.version == before


def test_behaviour_logprob_semantics_differ_from_the_raw_softmax(engine: TransformersEngine) -> None:
    """Guard against recording the raw model distribution: with temperature != 1 they differ."""
    tokenizer = load_tokenizer(STUDENT)
    sampling = Sampling(temperature=0.5, max_tokens=8, seed=1)
    r = engine.generate(toy_prompts(tokenizer)[:1], sampling, SupportKind.NONE, 0)[0]
    raw = recomputed_logmu(engine._model, r, Sampling())
    raw_at = raw.gather(-1, torch.from_numpy(r.response_ids.astype(np.int64))[:, None]).squeeze(-1).numpy()
    assert not np.allclose(r.behavior_logprobs, raw_at, atol=1e-3)
