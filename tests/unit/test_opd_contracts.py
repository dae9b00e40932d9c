"""Small contracts of the OPD package that the math tests do not pin (found by `make mutate`):
the estimators' keyword defaults are the config's defaults (a caller that leaves one out gets
what a run's config would give), and a shape refusal names both shapes.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from asyncopd.config.loss import LossConfig
from asyncopd.opd import OPDLoss, forward_kl_topk, reverse_kl_mc, reverse_kl_mc_terms, reverse_kl_topk

pytestmark = pytest.mark.unit

CONFIG = LossConfig()
SHARED = (
    "advantage",
    "correction",
    "clip_eps",
    "behavior_weight_cap",
    "m2po_tau",
    "decoupled_mode",
    "m2po_budget",
    "baseline",
)


@pytest.mark.parametrize("fn", [reverse_kl_mc, reverse_kl_mc_terms, OPDLoss.__init__])
def test_estimator_defaults_are_the_config_defaults(fn) -> None:  # type: ignore[no-untyped-def]
    params = inspect.signature(fn).parameters
    checked = [name for name in SHARED if name in params]
    assert "m2po_tau" in checked and "clip_eps" in checked
    for name in checked:
        assert params[name].default == getattr(CONFIG, name), name


@pytest.mark.parametrize("fn", [forward_kl_topk, reverse_kl_topk])
def test_a_sparse_shape_refusal_names_both_leading_shapes(fn) -> None:  # type: ignore[no-untyped-def]
    logits = torch.zeros(2, 4, 7)
    ids = torch.zeros(2, 3, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"ids leading shape \(2, 3\) != logits leading shape \(2, 4\)"):
        fn(logits, ids, torch.zeros(2, 3, 5))


def test_m2po_clip_harmful_tokens_are_decided_by_the_signs_alone() -> None:
    # A > 0 with r < 1 (and A < 0 with r > 1) is a token a PPO clip never acts on, however small
    # |A| is: alone in the batch it leaves the bounds open (only the floors apply).
    from asyncopd.opd.corrections import M2PO_CLIP_FLOOR_LOW, M2PO_CLIP_OPEN_HIGH, m2po_clip_bounds

    open_bounds = (M2PO_CLIP_FLOOR_LOW, M2PO_CLIP_OPEN_HIGH)
    for adv, lr in ((0.5, -1.0), (0.999, -2.0), (-0.5, 1.0), (-1e-3, 2.0)):
        assert m2po_clip_bounds(torch.tensor([lr]), torch.tensor([adv])) == open_bounds, (adv, lr)
    # the mirror images are harmful and far over the budget: the bounds close in
    for adv, lr in ((0.5, 1.0), (-0.5, -1.0)):
        assert m2po_clip_bounds(torch.tensor([lr]), torch.tensor([adv])) != open_bounds, (adv, lr)


def test_ppo_clip_acts_on_the_sign_of_a_small_advantage() -> None:
    from asyncopd.opd.corrections import ppo_clip_surrogate, ppo_clipped

    eps = 0.2
    ratio = torch.tensor([1.3, 0.7, 1.3, 0.7, 1.1])
    advantage = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5])
    assert ppo_clipped(ratio, advantage, eps).tolist() == [True, True, False, False, False]
    # asymmetric: only the upper bound moves
    assert ppo_clipped(ratio, advantage, eps, clip_eps_high=0.4).tolist() == [False, True, False, False, False]
    value, clipped = ppo_clip_surrogate(ratio.log(), advantage, eps)
    want = torch.where(clipped, -ratio.clamp(1 - eps, 1 + eps) * advantage, -ratio * advantage)
    assert torch.allclose(value, want)
    assert torch.allclose(value[:2], torch.tensor([-1.2 * 0.5, 0.8 * 0.5]))
