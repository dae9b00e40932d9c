"""A rollout replica whose weights lag the published learner version by more than the
staleness bound takes no prompts (everything it generated would be stale on arrival) until
weight sync catches up; it notices the run ending while it waits. Real cache service on
loopback and real Redis; the engine is a stand-in that only carries a weights version (the
loop's acquisition never generates)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from asyncopd.observability.metrics import RolloutMetrics
from asyncopd.records import SupportKind
from asyncopd.rollout.replica import RolloutLoop, RolloutReplica
from asyncopd.rollout.sampling import Sampling
from prometheus_client import CollectorRegistry
from test_cache_harness import SHARED_REDIS, make_config, running_cache, unique_prefix

pytestmark = pytest.mark.service


@dataclass
class WeightsOnly:
    """The engine edge: only the version of the weights it holds matters here."""

    version: int = 0
    streaming: bool = False


def test_a_lagging_replica_stops_acquiring_until_its_weights_catch_up() -> None:
    config = make_config(unique_prefix("laggate"), SHARED_REDIS, max_staleness=1, **{"learner.batch_size": 4})
    with running_cache(config) as (_, client):
        engine = WeightsOnly(version=0)
        metrics = RolloutMetrics(CollectorRegistry())
        loop = RolloutLoop(
            RolloutReplica(engine, "r0"),  # type: ignore[arg-type]
            client,
            sampling=Sampling(),
            support_kind=SupportKind.NONE,
            k=0,
            batch_size=2,
            wait_ms=0,
            metrics=metrics,
            max_lag=config.max_staleness,
        )
        client.publish_version(3)
        # It learns of version 3 with its first admission: the tickets go back at once.
        first = loop._acquire(2, 0)
        assert first.items == [] and not first.finished
        assert client.stats_snapshot().queue_depth["prompts_leased"] == 0  # released, not held
        assert metrics.lag_gated._value.get() == 1 and metrics.version_lag._value.get() == 3
        admitted = client.stats_snapshot().admitted
        assert loop._acquire(2, 200).items == []  # waits for weights, asks the cache for nothing
        assert client.stats_snapshot().admitted == admitted

        engine.version = 2  # within the bound of version 3 (lag 1)
        got = loop._acquire(2, 0)
        assert len(got.items) == 2 and metrics.lag_gated._value.get() == 0
        assert loop.gated_s > 0

        client.publish_version(9)
        assert loop._acquire(1, 0).items == []  # the learner moved on: released again
        client.publish_version(10, finished=True)
        loop._last_probe = 0.0
        assert loop._acquire(1, 100).finished, "a waiting replica learns that the run ended"


def test_without_a_bound_a_lagging_replica_keeps_acquiring() -> None:
    config = make_config(unique_prefix("nogate"), SHARED_REDIS, max_staleness=1, **{"learner.batch_size": 4})
    with running_cache(config) as (_, client):
        loop = RolloutLoop(
            RolloutReplica(WeightsOnly(version=0), "r0"),  # type: ignore[arg-type]
            client,
            sampling=Sampling(),
            support_kind=SupportKind.NONE,
            k=0,
            batch_size=2,
            wait_ms=0,
        )
        client.publish_version(3)
        assert len(loop._acquire(2, 0).items) == 2
