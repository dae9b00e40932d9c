"""The launcher's edges that need real servers: a private Redis and gRPC health waits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.redis import RedisConfig
from asyncopd.lab.launch.health import check_serving, wait_serving
from asyncopd.lab.launch.ports import free_port
from asyncopd.lab.launch.processes import ChildDied, Supervisor
from asyncopd.lab.launch.progress import RateMeter, scrape_counter, scrape_sums
from asyncopd.lab.launch.redis_server import (
    delete_prefix,
    ensure_redis,
    find_redis_server,
    redis_reachable,
    start_private_redis,
)
from asyncopd.wire import rpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

pytestmark = pytest.mark.service

SECRET = "launcher-test-secret"


@pytest.fixture
def supervisor(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs")
    yield sup
    sup.stop_all(grace_s=5.0)


@pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary")
def test_private_redis_with_password_keeps_it_out_of_argv(supervisor: Supervisor) -> None:
    config = RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", password=SECRET)  # nothing listens there
    assert not redis_reachable(config)
    endpoint = ensure_redis(supervisor, config)
    assert endpoint.private and endpoint.process is not None
    assert redis_reachable(config, endpoint.url)
    assert not redis_reachable(RedisConfig(url=endpoint.url), endpoint.url)  # the password is required
    cmdline = Path(f"/proc/{endpoint.process.pid}/cmdline").read_bytes()
    assert SECRET.encode() not in cmdline
    assert SECRET not in endpoint.process.tail(200)
    endpoint.process.stop(grace_s=5.0)
    assert not redis_reachable(config, endpoint.url)


@pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary")
def test_reachable_redis_is_reused_and_prefix_cleanup_deletes_only_the_run(supervisor: Supervisor) -> None:
    import redis

    private = start_private_redis(supervisor, RedisConfig())
    config = RedisConfig(url=private.url)
    reused = ensure_redis(supervisor, config)
    assert not reused.private and reused.url == private.url
    assert [c.name for c in supervisor.children] == ["redis"]  # nothing new started
    client = redis.Redis.from_url(private.url)
    for i in range(1200):
        client.set(f"asyncopd:run-a:{i}", 1)
    client.set("asyncopd:run-b:0", 1)
    assert delete_prefix(config, private.url, "asyncopd:run-a") == 1200
    assert client.keys("*") == [b"asyncopd:run-b:0"]
    client.close()


def test_wait_serving_sees_a_real_server_and_a_dead_child(tmp_path: Path, supervisor: Supervisor) -> None:
    server = rpc.start_server(ServerConfig(port=0), [], ["asyncopd.v1.Test"])
    try:
        address = server.address
        assert check_serving(address)
        assert check_serving(address, "asyncopd.v1.Test")
        assert wait_serving(address, None, timeout_s=5.0) < 5.0
        server.set_serving("asyncopd.v1.Test", False)
        assert not check_serving(address)
    finally:
        server.stop(0)
    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match="not SERVING"):
        wait_serving(nobody, None, timeout_s=0.5, poll_s=0.1)
    dying = supervisor.start("dying", [sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"])
    with pytest.raises(ChildDied, match="bad config"):
        wait_serving(nobody, dying, timeout_s=30.0)


def test_scraping_counters_and_histogram_sums_from_a_metrics_endpoint() -> None:
    registry = CollectorRegistry()
    tokens = Counter("asyncopd_rollout_generated_tokens", "t", ["replica"], registry=registry)
    phases = Histogram("asyncopd_learner_step_phase_seconds", "p", ["phase"], registry=registry)
    tokens.labels(replica="a").inc(100)
    tokens.labels(replica="b").inc(23)
    phases.labels(phase="compute").observe(1.5)
    phases.labels(phase="compute").observe(0.5)
    phases.labels(phase="data_wait").observe(0.25)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert scrape_counter(url, "asyncopd_rollout_generated_tokens") == 123.0
        assert scrape_counter(url, "asyncopd_missing") is None
        assert scrape_sums(url, "asyncopd_learner_step_phase_seconds", by="phase") == {
            "compute": 2.0,
            "data_wait": 0.25,
        }
        assert scrape_sums(url, "asyncopd_learner_step_phase_seconds") == {"": 2.25}
    finally:
        server.shutdown()
        thread.join(5)
    assert scrape_counter(f"http://127.0.0.1:{free_port()}/metrics", "x", timeout_s=0.5) is None
    meter = RateMeter(window_s=10.0)
    assert meter.update(0.0, now=0.0) is None
    assert meter.update(50.0, now=2.0) == 25.0
    assert meter.update(50.0, now=30.0) == pytest.approx(0.0)  # the window slid past the growth
