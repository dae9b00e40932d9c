"""The per-token staleness rule (stale_tokens: drop | mask) and the token budget's config rules,
without Redis: the policy's judged version and token test at the bound, `collate` masking
exactly the tokens older than the oldest usable version, and a token budget that could never
admit a ticket refused at load time, naming the field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from asyncopd.cache.policy import StalenessPolicy
from asyncopd.config.loader import ConfigError, load_config
from asyncopd.learner.batching import collate
from test_learner_collate import sample

pytestmark = pytest.mark.unit


def test_judged_version_is_the_oldest_under_drop_and_the_newest_under_mask() -> None:
    drop, mask = StalenessPolicy(2, 4), StalenessPolicy(2, 4, "mask")
    assert drop.judged_version(2, 3) == 2 and mask.judged_version(2, 3) == 3
    # at learner 5 (oldest usable 3): exactly the bound is usable, one more is not
    assert mask.token_usable(3, 5) and not mask.token_usable(2, 5)
    assert drop.is_stale(drop.judged_version(2, 3), 5) and not mask.is_stale(mask.judged_version(2, 3), 5)
    assert mask.is_stale(mask.judged_version(2, 2), 5)
    with pytest.raises(ValueError, match="stale_tokens"):
        StalenessPolicy(2, 4, "truncate")


def test_collate_masks_exactly_the_tokens_older_than_the_oldest_usable() -> None:
    a, b = sample(0, 3, 6), sample(1, 2, 4)
    a = dataclasses.replace(a, rollout=dataclasses.replace(a.rollout, versions=np.array([2, 2, 3, 3, 4, 4], np.int32)))
    b = dataclasses.replace(b, rollout=dataclasses.replace(b.rollout, versions=np.array([3, 3, 3, 3], np.int32)))
    full = collate([a, b], "forward_kl_topk")
    masked = collate([a, b], "forward_kl_topk", oldest_usable=3)
    policy = StalenessPolicy(2, 4, "mask")
    for i, s in enumerate([a, b]):
        naive = [policy.token_usable(int(v), 5) for v in s.rollout.versions]
        assert masked.valid[i, : len(naive)].tolist() == naive
        assert not masked.valid[i, len(naive) :].any()
    assert full.tokens == 10 and masked.tokens == 8  # a's two version-2 tokens
    # everything else is the same batch
    assert (masked.input_ids == full.input_ids).all() and (masked.logit_index == full.logit_index).all()


def test_a_token_budget_below_one_ticket_per_shard_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.sampling.max_tokens=100", "cache.max_tokens_in_flight=99"])
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith("cache.max_tokens_in_flight:"))
    assert "at least 100" in line, str(err.value)
    load_config(None, ["rollout.sampling.max_tokens=100", "cache.max_tokens_in_flight=100"])
    with pytest.raises(ConfigError, match="stale_tokens"):
        load_config(None, ["stale_tokens=truncate"])
