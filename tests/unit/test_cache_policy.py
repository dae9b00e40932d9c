"""asyncopd.cache.policy against naive formulas written straight from the rules.

The naive references count versions one by one (a sample is usable at learner version v when
it is one of the versions v, v-1, ..., v-eta; a window holds eta + 1 batches), so they share no
arithmetic with the policy. Every boundary is pinned on both sides: an off-by-one in the policy
(`<=` for `<`, `eta` for `eta + 1`, `published` for `published + 1`) fails these tests.
"""

from __future__ import annotations

import importlib.resources
import re

import pytest
from asyncopd.cache import scripts
from asyncopd.cache.policy import StalenessPolicy, check_unique
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def naive_usable(oldest_version: int, version: int, eta: int) -> bool:
    """Usable iff the oldest token version is one of the eta + 1 newest versions (v, v-1, ...)."""
    return oldest_version in [version - back for back in range(eta + 1)] or oldest_version > version


def naive_window(eta: int, batch_size: int) -> int:
    total = 0
    for _ in range(eta + 1):  # one batch per version the learner may still consume
        total += batch_size
    return total


def test_window_is_eta_plus_one_batches() -> None:
    assert StalenessPolicy(0, 4).window == 4  # strict sync: one batch per version
    assert StalenessPolicy(1, 4).window == 8
    assert StalenessPolicy(4, 3).window == 15


@given(st.integers(0, 50), st.integers(1, 500))
def test_window_matches_the_naive_count(eta: int, batch_size: int) -> None:
    assert StalenessPolicy(eta, batch_size).window == naive_window(eta, batch_size)


@pytest.mark.parametrize("eta", [0, 1, 2, 7])
def test_stale_boundary_exactly(eta: int) -> None:
    """A rollout exactly at the bound (staleness eta) is accepted; one version past it is stale."""
    policy, v = StalenessPolicy(eta, 4), 10
    at_bound, past_bound = v - eta, v - eta - 1
    assert policy.oldest_usable(v) == at_bound
    assert not policy.is_stale(at_bound, v)
    assert policy.is_stale(past_bound, v)
    assert policy.within_bound(eta) and not policy.within_bound(eta + 1)
    assert not policy.is_stale(v, v) and not policy.is_stale(v + 1, v)  # fresh, or one ahead


@given(st.integers(0, 20), st.integers(0, 200), st.integers(-50, 250))
def test_stale_matches_the_naive_rule(eta: int, version: int, oldest: int) -> None:
    policy = StalenessPolicy(eta, 1)
    assert policy.is_stale(oldest, version) == (not naive_usable(oldest, version, eta))
    # the same rule in staleness terms, and as the number the Lua compares against
    assert policy.within_bound(version - oldest) == naive_usable(oldest, version, eta)
    assert (oldest < policy.oldest_usable(version)) == policy.is_stale(oldest, version)


@pytest.mark.parametrize("published", [0, 3])
def test_future_boundary_exactly(published: int) -> None:
    """Tokens one version ahead of the published one are believable (weights go to the replicas
    before the version goes to the cache); two ahead are from the future."""
    policy = StalenessPolicy(1, 4)
    assert policy.newest_allowed(published) == published + 1
    policy.check_token_version(published, published, "rollouts[0].versions")
    policy.check_token_version(published + 1, published, "rollouts[0].versions")
    with pytest.raises(ValueError, match=rf"rollouts\[0\]\.versions: version {published + 2} is from the future"):
        policy.check_token_version(published + 2, published, "rollouts[0].versions")


@given(st.integers(0, 20), st.integers(0, 500), st.one_of(st.none(), st.integers(0, 500)), st.booleans())
def test_a_restarted_learner_starts_where_every_old_token_is_stale(
    eta: int, published: int, checkpoint: int | None, restarted: bool
) -> None:
    """Past every version a replica may hold tokens of (one ahead of the published version, or of
    the checkpoint's when that is newer, e.g. after the cache lost its state): each is stale at
    the start version, and one version lower would leave the newest one usable."""
    policy = StalenessPolicy(eta, 4)
    start = policy.start_version(published, checkpoint, restarted)
    if not restarted and published == 0 and checkpoint is None:
        assert start == 0  # the first learner of a fresh run
        return
    newest_old = policy.newest_allowed(max(published, checkpoint or 0))
    assert all(policy.is_stale(v, start) for v in range(newest_old + 1))
    assert not policy.is_stale(newest_old, start - 1), "no larger jump than needed"


@pytest.mark.parametrize(("eta", "batch_size"), [(0, 4), (1, 4), (3, 2)])
def test_pull_size_boundary_exactly(eta: int, batch_size: int) -> None:
    """A batch of exactly the window can be served; one more can never be; below 1 is refused."""
    policy = StalenessPolicy(eta, batch_size)
    window = naive_window(eta, batch_size)
    policy.check_pull_size(1)
    policy.check_pull_size(window)
    with pytest.raises(ValueError, match=f"{window + 1} can never be served.*= {window} samples"):
        policy.check_pull_size(window + 1)
    with pytest.raises(ValueError, match="size: must be >= 1, got 0"):
        policy.check_pull_size(0)


def test_a_sample_named_twice_in_one_request_is_refused() -> None:
    check_unique(["a", "b", "c"], "rollouts")
    check_unique([], "rollouts")
    with pytest.raises(ValueError, match=r"rollouts\[2\]\.sample_id: 'a' appears twice"):
        check_unique(["a", "b", "a"], "rollouts")


@pytest.mark.parametrize(("eta", "batch_size"), [(-1, 4), (0, 0)])
def test_impossible_policies_are_refused(eta: int, batch_size: int) -> None:
    with pytest.raises(ValueError, match="must be >= "):
        StalenessPolicy(eta, batch_size)


def test_lua_scripts_ship_as_package_data_and_derive_no_bound() -> None:
    """Every script loads from the package's lua/ folder, and none re-derives the staleness
    rules: no `eta` or `max_staleness` arithmetic, only the numbers policy.py passes in."""
    folder = importlib.resources.files("asyncopd.cache").joinpath("lua")
    for name in scripts.NAMES:
        assert folder.joinpath(f"{name}.lua").is_file(), name
        src = scripts.source(name)
        assert src.startswith("-- Helpers every script starts with"), name
        assert not re.search(r"\beta\b|max_staleness|\bbsz\b", src), name
    with pytest.raises(ValueError, match="no cache script"):
        scripts.source("nope")
