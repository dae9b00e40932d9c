"""The staleness policy is one value shared by the store, the servicer and Stats: it cannot be
changed in place (a setter on one would silently move the others' bounds), and equal settings
give equal, hashable policies. Found by `make mutate` (frozen=False survived the policy tests).
"""

from __future__ import annotations

import dataclasses

import pytest
from asyncopd.cache.policy import StalenessPolicy

pytestmark = pytest.mark.unit


def test_the_policy_cannot_be_changed_in_place() -> None:
    policy = StalenessPolicy(max_staleness=2, batch_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_staleness = 5  # type: ignore[misc]
    assert policy.window == 12
    assert hash(policy) == hash(StalenessPolicy(2, 4)) and policy == StalenessPolicy(2, 4)
