"""The cache on a real Redis Cluster: three masters started here from the redis-server binary,
two cache shards whose hash tags land on different masters, put -> claim -> score -> pull -> ack
through the sharded store with payload frames written by the producers themselves, exact
accounting, and every frame gone with its trained sample. The servers are stopped by handle.
And the same sharded cache served over gRPC (on the machine's Redis): producers write each frame
into its sample's shard themselves, and the learner's pulls take batches from both shards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from asyncopd.cache.connection import UnsafeRedis, check_eviction_policy, connect
from asyncopd.cache.shards import ShardedStore
from asyncopd.cache.store import LearnerFenced, PayloadRef, StoredRollout, StoredScores, StorePolicy
from asyncopd.config.redis import RedisConfig
from asyncopd.lab.launch.redis_cluster import LocalCluster, spread_prefix
from asyncopd.wire import payload
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.convert import Limits
from asyncopd.wire.payload_store import PayloadStore
from asyncopd.wire.rpc import channel
from required_tools import require_tool
from test_cache_harness import (
    SHARED_REDIS,
    VOCAB,
    in_thread,
    make_config,
    make_rollout,
    make_scores,
    running_cache,
    unique_prefix,
    wipe,
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    exe, cli = require_tool("redis-server"), require_tool("redis-cli")
    with LocalCluster(tmp_path_factory.mktemp("cluster"), exe=exe, cli=cli) as c:
        yield c


def _node(client: redis.RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)


def test_two_shards_on_two_masters_put_score_pull_ack(cluster: LocalCluster) -> None:
    config = RedisConfig(url=f"redis://127.0.0.1:{cluster.ports[0]}/0", cluster=True)
    client = connect(config)
    assert isinstance(client, redis.RedisCluster)
    # a run prefix whose two shard tags hash to slots of different masters
    prefix = spread_prefix(lambda key: _node(client, key), "test-cl", 2)
    policy = StorePolicy(max_staleness=1, batch_size=2, byte_budget=1 << 20)
    store = ShardedStore(client, prefix, policy, shards=2)
    frames = PayloadStore(connect(config), prefix)
    try:
        admitted = store.acquire("r0", 4)
        tickets = [a.ticket for a in admitted.tickets]
        assert len(tickets) == 4 and {payload.ticket_shard(t) for t in tickets} == {0, 1}
        assert len({a.pos for a in admitted.tickets}) == 4, "shards hand out disjoint dataset positions"

        rollouts = []
        for i, t in enumerate(tickets):
            key = frames.new_key("r", f"{t}/s", payload.frame_prefix(prefix, t))
            frames.write([(key, bytes([i]) * 100)])
            rollouts.append(StoredRollout(f"{t}/s", t, 0, 6, 0, PayloadRef(key, 100, i)))
        assert store.put_rollouts(rollouts).accepted == 4

        claimed = store.claim_rollouts("t0", 4)
        assert sorted(m.sample_id for m in claimed.samples) == sorted(r.sample_id for r in rollouts)
        scores = []
        for m in claimed.samples:
            key = frames.new_key("s", m.sample_id, payload.scores_prefix(prefix, m.rollout.key))
            assert _node(client, key) == _node(client, m.rollout.key), "scores sit next to their rollout"
            frames.write([(key, b"s" * 50)])
            scores.append(StoredScores(m.sample_id, PayloadRef(key, 50, 7)))
        assert store.put_scores(scores).accepted == 4

        batches = [store.pull_batch(2, 0, "learner") for _ in range(2)]
        assert all(b.batch is not None for b in batches)
        ids = [m.sample_id for b in batches if b.batch for m in b.batch.samples]
        assert sorted(ids) == sorted(r.sample_id for r in rollouts)
        # the learner reads the frames straight from the cluster (one MGET per slot)
        keys = [k for b in batches if b.batch for m in b.batch.samples for k in (m.rollout.key, m.scores.key)]  # type: ignore[union-attr]
        assert all(f is not None for f in frames.read(keys, [100, 50] * 4))
        assert sum(store.ack_batch(b.batch.batch_id) for b in batches if b.batch) == 4

        stats = store.stats()
        assert (stats.produced, stats.trained, stats.dropped, stats.in_flight) == (4, 4, {}, 0)
        assert stats.produced == stats.trained + sum(stats.dropped.values()) + stats.in_flight
        for shard in (0, 1):  # each shard did its share, on its own master
            part = store.stores[shard].stats()
            assert part.produced == part.trained == 2
        assert frames.read(keys, [100, 50] * 4) == [None] * 8, "acked samples' frames are deleted with them"
    finally:
        frames.close()
        store.close()


def test_a_sharded_cache_over_grpc_routes_by_ticket_and_key() -> None:
    prefix = unique_prefix("shards")
    config = make_config(prefix, max_staleness=1, **{"learner.batch_size": 2, "cache.shards": 2})
    with running_cache(config) as (cache, _):
        frames = PayloadStore(redis.Redis.from_url(SHARED_REDIS), prefix, ttl_s=60.0)
        ch = channel(cache.address)
        client = CacheClient(ch, Limits(vocab_size=VOCAB), payloads=frames)
        try:
            # every shard fences the learner: after a second one starts, the first is refused on both
            old = CacheClient(channel(cache.address), Limits(vocab_size=VOCAB), payloads=frames)
            old.begin_learner()
            client.begin_learner()
            assert client.learner_epoch > old.learner_epoch
            for store in cache.store.stores:  # type: ignore[union-attr]
                with pytest.raises(LearnerFenced):
                    store.publish_version(0, epoch=old.learner_epoch)
            # each shard admits its share of the window (eta + 1) * B = 4: two prompts each
            prompts, _, _ = client.acquire_prompts("r0", 8)
            assert len(prompts) == 4 and {payload.ticket_shard(p.ticket) for p in prompts} == {0, 1}
            assert client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]).accepted == 4
            claimed = client.claim_rollouts("t0", 4)
            assert len(claimed) == 4
            assert client.put_scores([make_scores(r) for r in claimed]).accepted == 4
            shards = set()
            for _ in range(2):
                batch = client.pull_batch(2, 0)
                assert batch is not None and len(batch.samples) == 2
                shards |= {payload.ticket_shard(s.rollout.ticket) for s in batch.samples}
                assert client.ack_batch(batch.batch_id) == 2
            assert shards == {0, 1}, "the learner takes batches from both shards"
            stats = client.stats_snapshot()
            assert (stats.produced, stats.trained, stats.in_flight, stats.dropped) == (4, 4, 0, {})
            assert stats.invariant_holds()
            assert not list(frames.redis.scan_iter(match=f"{prefix}:*p[rs]:*")), "trained samples' frames are gone"
        finally:
            ch.close()
            frames.close()


def test_the_cache_service_on_the_cluster_wakes_waiters_and_keeps_accounts(cluster: LocalCluster) -> None:
    url = f"redis://127.0.0.1:{cluster.ports[1]}/0"
    values = {"redis.cluster": True, "cache.shards": 2, "learner.batch_size": 2, "cache.poll_interval_ms": 5000.0}
    config = make_config(unique_prefix("cl-svc"), url, max_staleness=1, **values)
    # the cluster goes away with the test module: nothing to wipe (a plain client could not)
    with running_cache(config, wipe_after=False) as (cache, _):
        frames = PayloadStore.from_config(config.redis, ttl_s=60.0)
        ch = channel(cache.address)
        client = CacheClient(ch, Limits(vocab_size=VOCAB), payloads=frames)
        try:
            prompts, _, _ = client.acquire_prompts("r0", 4)
            assert {payload.ticket_shard(p.ticket) for p in prompts} == {0, 1}
            assert client.put_rollouts([make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]).accepted == 4
            claimed = client.claim_rollouts("t0", 4)
            pull, pulled = in_thread(lambda: client.pull_batch(2, 0, wait_ms=4000))
            time.sleep(0.3)  # the pull waits on an empty pool now
            assert client.put_scores([make_scores(r) for r in claimed]).accepted == 4
            pull.join(timeout=10)
            # only a pub/sub wake-up through the cluster explains a return well before the 5 s poll
            assert pulled["value"] is not None and pulled["seconds"] < 2.0, pulled
            assert client.ack_batch(pulled["value"].batch_id) == 2
            batch = client.pull_batch(2, 0, wait_ms=2000)
            assert batch is not None and client.ack_batch(batch.batch_id) == 2
            stats = client.stats_snapshot()
            assert (stats.produced, stats.trained, stats.in_flight, stats.dropped) == (4, 4, 0, {})
            assert stats.invariant_holds()
        finally:
            ch.close()
            frames.close()


def test_an_evicting_master_anywhere_in_the_cluster_is_refused(cluster: LocalCluster) -> None:
    client = connect(RedisConfig(url=f"redis://127.0.0.1:{cluster.ports[0]}/0", cluster=True))
    last = redis.Redis(port=cluster.ports[2])
    try:
        assert check_eviction_policy(client) == "noeviction"
        last.config_set("maxmemory-policy", "allkeys-lru")  # one master of three
        with pytest.raises(UnsafeRedis, match=f"{cluster.ports[2]}.*allkeys-lru"):
            check_eviction_policy(client)
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.close()
        client.close()


def _sharded_frames(store: ShardedStore, frames: PayloadStore, prefix: str, tickets: list[str]) -> None:
    """Put a rollout per ticket, score every one (frames written as producers do)."""
    rollouts = []
    for t in tickets:
        key = frames.new_key("r", f"{t}/s", payload.frame_prefix(prefix, t))
        frames.write([(key, b"r" * 64)])
        rollouts.append(StoredRollout(f"{t}/s", t, 0, 6, 0, PayloadRef(key, 64, 1)))
    assert store.put_rollouts(rollouts).accepted == len(tickets)
    scores = []
    for m in store.claim_rollouts("t0", len(tickets)).samples:
        key = frames.new_key("s", m.sample_id, payload.scores_prefix(prefix, m.rollout.key))
        frames.write([(key, b"s" * 32)])
        scores.append(StoredScores(m.sample_id, PayloadRef(key, 32, 2)))
    assert store.put_scores(scores).accepted == len(tickets)


def test_a_sharded_prompt_cursor_survives_a_redis_wipe() -> None:
    prefix = unique_prefix("shard-cursor")
    policy = StorePolicy(max_staleness=1, batch_size=2, byte_budget=1 << 20)
    client = redis.Redis.from_url(SHARED_REDIS)
    frames = PayloadStore(redis.Redis.from_url(SHARED_REDIS), prefix)
    store = ShardedStore(client, prefix, policy, shards=2)
    try:
        epoch = store.begin_learner(False, 0, None).epoch
        admitted = store.acquire("r0", 4).tickets
        assert sorted(a.pos for a in admitted) == [0, 1, 2, 3]
        _sharded_frames(store, frames, prefix, [a.ticket for a in admitted])
        batch = store.pull_batch(2, 0, "learner", epoch=epoch).batch
        assert batch is not None
        trained = {a.pos for a in admitted if f"{a.ticket}/s" in {m.sample_id for m in batch.samples}}
        state = store.cursor_state(epoch, [batch.batch_id])
        # one cursor in dataset positions: the batch's two are saved, the other two stay open
        assert state.cursor == 4 and set(state.open) == {0, 1, 2, 3} - trained
    finally:
        store.close()
    wipe(SHARED_REDIS, prefix)  # Redis lost everything; the cache restarts
    store = ShardedStore(redis.Redis.from_url(SHARED_REDIS), prefix, policy, shards=2)
    try:
        start = store.begin_learner(True, 1, state)
        assert start.cursor_restored == 2
        again = store.acquire("r0", 4).tickets
        # the open positions again (re-issued by their shards), the rest on from the cursor (each
        # shard from its own next position): nothing trained comes back, nothing below it is skipped
        got = {a.pos for a in again}
        assert len(got) == 4 and set(state.open) <= got and not got & trained
        assert all(p >= state.cursor for p in got - set(state.open))
    finally:
        store.close()
        frames.close()
        wipe(SHARED_REDIS, prefix)
