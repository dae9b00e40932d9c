"""The rollout autoscaler's pure parts: the scaling policy and the pipeline signals."""

from __future__ import annotations

import pytest
from asyncopd.autoscaler.main import policy_params
from asyncopd.autoscaler.policy import Observation, PolicyParams, ScalingPolicy
from asyncopd.autoscaler.signals import SignalWindow
from asyncopd.config import load_config

pytestmark = pytest.mark.unit


def _policy(**kw: float) -> ScalingPolicy:
    base: dict = dict(min_replicas=1, max_replicas=4, scale_up_threshold=0.5, scale_down_threshold=0.5)
    base.update(kw)
    return ScalingPolicy(PolicyParams(**base))


def _obs(now: float, replicas: int, wait: float = 0.0, blocked: float = 0.0) -> Observation:
    return Observation(now=now, replicas=replicas, learner_wait=wait, admission_blocked=blocked)


def test_scales_up_when_learner_waits_and_down_when_admission_blocks() -> None:
    p = _policy()
    up = p.decide(_obs(0, 2, wait=0.6))
    assert (up.replicas, up.kind) == (3, "learner_starved")
    down = p.decide(_obs(1, 3, blocked=0.9))
    assert (down.replicas, down.kind) == (2, "admission_blocked")


def test_no_pressure_or_below_threshold_holds() -> None:
    p = _policy()
    assert p.decide(_obs(0, 2)).replicas == 2
    assert p.decide(_obs(1, 2, wait=0.49, blocked=0.49)).replicas == 2


def test_conflicting_signals_hold_and_reset_the_streak() -> None:
    p = _policy(sustain=2)
    assert p.decide(_obs(0, 2, wait=1.0)).replicas == 2  # streak 1/2
    both = p.decide(_obs(1, 2, wait=1.0, blocked=1.0))
    assert (both.replicas, both.reason) == (2, "conflicting signals")
    assert p.decide(_obs(2, 2, wait=1.0)).replicas == 2  # streak restarted at 1/2
    assert p.decide(_obs(3, 2, wait=1.0)).replicas == 3


def test_hysteresis_needs_sustained_pressure() -> None:
    p = _policy(sustain=3)
    assert [p.decide(_obs(t, 1, wait=0.8)).replicas for t in range(3)] == [1, 1, 2]
    # an interruption resets the streak
    p = _policy(sustain=3)
    seq = [0.8, 0.8, 0.0, 0.8, 0.8, 0.8]
    assert [p.decide(_obs(t, 1, wait=w)).replicas for t, w in enumerate(seq)] == [1, 1, 1, 1, 1, 2]


def test_cooldowns_after_a_change() -> None:
    p = _policy(cooldown_up_s=60, cooldown_down_s=300)
    assert p.decide(_obs(0, 1, wait=1.0)).replicas == 2
    held = p.decide(_obs(30, 2, wait=1.0))
    assert (held.replicas, held.reason) == (2, "learner waiting, in scale-up cooldown")
    assert p.decide(_obs(60, 2, wait=1.0)).replicas == 3
    # scale-down waits for its own, longer cooldown counted from the last change (t=60)
    assert p.decide(_obs(200, 3, blocked=1.0)).replicas == 3
    assert p.decide(_obs(359, 3, blocked=1.0)).replicas == 3
    assert p.decide(_obs(360, 3, blocked=1.0)).replicas == 2


def test_bounds_are_never_crossed_and_restored_after_manual_scaling() -> None:
    p = _policy(step_up=3, step_down=3)
    assert p.decide(_obs(0, 3, wait=1.0)).replicas == 4  # 3 + 3 capped at max 4
    at_max = p.decide(_obs(1, 4, wait=1.0))
    assert (at_max.replicas, at_max.reason) == (4, "learner waiting, at max_replicas")
    assert p.decide(_obs(2, 2, blocked=1.0)).replicas == 1  # 2 - 3 floored at min 1
    assert p.decide(_obs(3, 1, blocked=1.0)).replicas == 1
    # someone ran `kubectl scale --replicas 9`: back to the bound at once, whatever the signals
    fixed = p.decide(_obs(4, 9))
    assert (fixed.replicas, fixed.kind) == (4, "bounds")
    assert p.decide(_obs(5, 0, wait=0.0)).replicas == 1


def test_scale_from_zero_when_allowed() -> None:
    p = _policy(min_replicas=0)
    assert p.decide(_obs(0, 0, wait=1.0)).replicas == 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_replicas=3, max_replicas=2),
        dict(scale_up_threshold=0.0),
        dict(scale_down_threshold=1.5),
        dict(sustain=0),
        dict(cooldown_up_s=-1),
    ],
)
def test_invalid_params_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        _policy(**kw)


def test_fractions_outside_unit_interval_are_rejected() -> None:
    with pytest.raises(ValueError, match="learner_wait"):
        _policy().decide(_obs(0, 1, wait=1.5))


def test_policy_params_follow_the_config_section() -> None:
    cfg = load_config(None, ["autoscaler.min_replicas=2", "autoscaler.max_replicas=6", "autoscaler.sustain=4"])
    params = policy_params(cfg.autoscaler)
    assert (params.min_replicas, params.max_replicas, params.sustain) == (2, 6, 4)


def _stats(scored: int, max_staleness: int = 1, held: int = 0, budget: int = 1000, batch_size: int = 8) -> dict:
    return {
        "queue_depth": {"unscored": 0, "scoring": 0, "scored": scored, "claimed": 0},
        "max_staleness": max_staleness,
        # what the cache's Stats report (its policy computes it; the autoscaler only reads it)
        "staleness_window": (max_staleness + 1) * batch_size,
        "bytes_held": held,
        "byte_budget": budget,
    }


def test_signals_learner_waits_when_less_than_a_batch_is_ready() -> None:
    w = SignalWindow(batch_size=8, window=4)
    assert w.observe(_stats(7), {"finished": False}).learner_wait == 1.0
    p = w.observe(_stats(8), {"finished": False})
    assert (p.learner_wait, p.admission_blocked, p.ready_samples) == (0.5, 0.0, 8)


def test_signals_admission_blocks_at_the_staleness_capacity_or_full_budget() -> None:
    w = SignalWindow(batch_size=8, window=2)
    # (max_staleness + 1) batches ready: the cache admits nothing more
    assert w.observe(_stats(16, max_staleness=1), {"finished": False}).admission_blocked == 1.0
    assert w.observe(_stats(15, max_staleness=1), {"finished": False}).admission_blocked == 0.5
    assert w.observe(_stats(15, max_staleness=1), {"finished": False}).admission_blocked == 0.0
    w = SignalWindow(batch_size=8, window=1)
    assert w.observe(_stats(10, max_staleness=8, held=950), {"finished": False}).admission_blocked == 1.0
    assert w.observe(_stats(10, max_staleness=8, held=949), {"finished": False}).admission_blocked == 0.0


def test_signals_read_the_staleness_window_from_the_cache_stats() -> None:
    """The window the cache reports decides, not one re-derived from max_staleness and the
    autoscaler's own batch size; a cache that reports none is refused loudly."""
    w = SignalWindow(batch_size=8, window=1)
    reported = {**_stats(0, max_staleness=1), "staleness_window": 10}  # (1 + 1) * 8 would be 16
    assert w.observe({**reported, "queue_depth": {"scored": 10}}, {"finished": False}).admission_blocked == 1.0
    assert w.observe({**reported, "queue_depth": {"scored": 9}}, {"finished": False}).admission_blocked == 0.0
    missing = {k: v for k, v in _stats(0).items() if k != "staleness_window"}
    with pytest.raises(ValueError, match="staleness_window"):
        w.observe(missing, {"finished": False})


def test_signals_window_forgets_old_observations() -> None:
    w = SignalWindow(batch_size=4, window=2)
    for _ in range(3):
        w.observe(_stats(0), {"finished": False})
    assert w.observe(_stats(4), {"finished": False}).learner_wait == 0.5
    assert w.observe(_stats(4), {"finished": False}).learner_wait == 0.0


def test_a_finished_run_exerts_no_pressure() -> None:
    class Status:
        finished = True

    w = SignalWindow(batch_size=8, window=1)
    p = w.observe(_stats(0), Status())
    assert (p.learner_wait, p.admission_blocked) == (0.0, 0.0)


def test_signals_admission_blocks_when_the_cache_refused_prompts_since_last_look() -> None:
    w = SignalWindow(batch_size=8, window=1)
    running = {"finished": False}

    def stats(refused: int) -> dict:
        return {**_stats(8, max_staleness=4), "counters": {"admission_blocked": refused}}

    assert w.observe(stats(5), running).admission_blocked == 0.0  # first look: no delta yet
    assert w.observe(stats(7), running).admission_blocked == 1.0  # two refusals since
    assert w.observe(stats(7), running).admission_blocked == 0.0  # none since
    assert w.observe(stats(0), running).admission_blocked == 0.0  # counter reset (Redis lost state)
    assert w.observe(stats(1), running).admission_blocked == 1.0


def test_a_run_the_cache_marks_finished_exerts_no_pressure() -> None:
    w = SignalWindow(batch_size=8, window=1)
    p = w.observe({**_stats(0), "finished": True}, {"finished": False})
    assert (p.learner_wait, p.admission_blocked) == (0.0, 0.0)
