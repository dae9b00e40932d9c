"""`bench fleet` end to end: simulated replicas against the real cache service and Redis keep
the accounting exact and never train a sample staler than the bound."""

from __future__ import annotations

import argparse
import threading

import numpy as np
import pytest
from asyncopd.lab.bench import fleet as bench
from asyncopd.lab.fleet.engines import LengthModel, SimulatedRollout, SimulatedTeacher, SimulatedWeights
from asyncopd.records import Prompt, SupportKind, TaskInfo
from asyncopd.wire import rollout_from_proto, rollout_to_proto
from asyncopd.wire.convert import Limits, scores_from_proto, scores_to_proto

pytestmark = pytest.mark.service


def fleet_args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("eta", [0, 1])
def test_small_fleet_accounting_and_staleness(eta: int) -> None:
    # The checks below mean something only after several learner steps. The fleet runs for a
    # fixed time, so on a busy machine it gets longer runs (2, 4, ... 32 s) until it has them,
    # rather than a fixed "3 steps in 2 s" that a slow machine fails.
    for seconds in (2.0, 4.0, 8.0, 16.0, 32.0):
        args = fleet_args(
            rollouts=4, teachers=2, rollout_tps=2000.0, teacher_tps=8000.0, learner_step_s=0.05, batch_size=4,
            max_staleness=eta, seconds=seconds, mean_tokens=64.0, max_tokens=256,
        )  # fmt: skip
        rep = bench.measure(args)
        assert rep["invariant_holds"], rep
        if rep["steps"] >= 3:
            break
    assert rep["steps"] >= 3, f"the learner trained {rep['steps']} steps in {seconds:.0f} s"
    assert rep["produced"] == rep["trained"] + sum(rep["dropped"].values()) + rep["in_flight"]
    assert rep["trained"] == rep["samples_trained"] == 4 * rep["steps"]
    hist = {int(k): v for k, v in rep["staleness_histogram"].items()}
    assert sum(hist.values()) == rep["samples_trained"]
    assert max(hist) <= eta
    assert max(int(k) for k in rep["staleness_served"]) <= eta
    if eta == 0:
        assert hist == {0: rep["samples_trained"]}
    assert rep["cache_cpu_seconds"] > 0 and rep["learner_samples_per_s"] > 0


def test_small_fleet_with_token_budget_and_masked_stale_tokens() -> None:
    """stale_tokens: mask with a token budget of 3 tickets (each reserving --max-tokens): the
    accounting stays exact and every trained token is within the bound (the learner stand-in
    masks the older ones as collate does)."""
    for seconds in (4.0, 8.0, 16.0, 32.0):
        args = fleet_args(
            rollouts=4, teachers=2, rollout_tps=2000.0, teacher_tps=8000.0, learner_step_s=0.05, batch_size=4,
            max_staleness=1, seconds=seconds, mean_tokens=64.0, max_tokens=256, stale_tokens="mask",
            max_tokens_in_flight=3 * 256,
        )  # fmt: skip
        rep = bench.measure(args)
        assert rep["invariant_holds"], rep
        if rep["steps"] >= 3:
            break
    assert rep["steps"] >= 3, f"the learner trained {rep['steps']} steps in {seconds:.0f} s"
    assert rep["config"]["max_tokens_in_flight"] == 768 and rep["config"]["stale_tokens"] == "mask"
    hist = {int(k): v for k, v in rep["staleness_histogram"].items()}
    assert sum(hist.values()) == rep["samples_trained"] and max(hist) <= 1


def test_simulated_records_pass_wire_validation() -> None:
    """What the simulated engines emit is valid for the cache: ids in the vocabulary, sorted
    top-K log-probs whose mass with the tail is at most 1, per-token versions of the weights."""
    vocab, k = 1000, 8
    weights = SimulatedWeights()
    weights.publish(3)
    engine = SimulatedRollout(
        "r", weights, tokens_per_s=1e9, lengths=LengthModel(20, 50), support_kind=SupportKind.STUDENT_TOPK, k=k,
        vocab_size=vocab, seed=0,
    )  # fmt: skip
    prompts = [Prompt(f"p{i}", np.arange(1, 5, dtype=np.int32), TaskInfo("toy", "0"), ticket=f"t{i}") for i in range(6)]
    rollouts = engine.generate(prompts, threading.Event())
    limits = Limits(vocab_size=vocab)
    teacher = SimulatedTeacher("t", tokens_per_s=1e9, topk=k, vocab_size=vocab, seed=1)
    for r, s in zip(rollouts, teacher.score(rollouts, threading.Event()), strict=True):
        back = rollout_from_proto(rollout_to_proto(r, "float32"), limits)
        assert 1 <= back.num_tokens <= 50 and set(back.versions.tolist()) == {3}
        assert back.support_ids is not None and back.support_logprobs is not None
        assert all(len(set(row)) == k for row in back.support_ids.tolist())
        picked = back.support_ids == back.response_ids[:, None]
        assert picked.any(axis=1).all(), "the sampled token is in the student's top-K support"
        scores = scores_from_proto(scores_to_proto(s, "float32"), limits, num_tokens=r.num_tokens, support_size=k)
        assert scores.topk_logprobs is not None and scores.tail_logmass is not None
        assert (np.diff(scores.topk_logprobs, axis=1) <= 0).all()
        mass = np.exp(scores.topk_logprobs).sum(axis=1) + np.exp(scores.tail_logmass)
        np.testing.assert_allclose(mass, 1.0, rtol=1e-4)
