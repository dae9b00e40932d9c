"""Weight sync end to end on loopback: a real learner gRPC server hosting the publisher, and
real subscriber processes joining, leaving and dying (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.manifest import ManifestError
from asyncopd.weightsync.receive import ReceiveBuffers
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.wire.rpc import RunningServer, start_server
from waiting import returns_within
from weightsync_replica import digest

pytestmark = pytest.mark.service

TIMEOUT_S = 2.0
HERE = Path(__file__).parent


def weights(step: int) -> list[tuple[str, torch.Tensor]]:
    """A small 'model' with mixed dtypes, several buckets at bucket_mb=0.05, different per step."""
    g = torch.Generator().manual_seed(step)
    return [
        ("embed.weight", torch.randn(64, 96, generator=g)),
        ("layer.0.w", torch.randn(96, 96, generator=g).to(torch.bfloat16)),
        ("layer.0.b", torch.randn(96, generator=g).to(torch.float16)),
        ("layer.1.w", torch.randn(128, 100, generator=g)),
        ("steps", torch.tensor([step], dtype=torch.int64)),
        ("mask", torch.rand(33, generator=g) > 0.5),
    ]


@pytest.fixture
def learner() -> Iterator[tuple[CollectiveBroadcast, RunningServer]]:
    publisher = CollectiveBroadcast(WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.05, checksum=True))
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    yield publisher, server
    publisher.close()
    server.stop(0)


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    # A hang detector, not a stopwatch: replicas are processes that import torch, and on a loaded
    # 2-core machine three of them took over 20 s to register.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def start_replica(
    address: str, name: str, log: Path, timeout_s: float = TIMEOUT_S, heartbeat_s: float = 0.5
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [
        sys.executable,
        str(HERE / "weightsync_replica.py"),
        address,
        name,
        str(log),
        str(timeout_s),
        str(heartbeat_s),
    ]
    return subprocess.Popen(argv, env=env)


def applied(log: Path) -> list[dict]:  # type: ignore[type-arg]
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_late_joiner_and_dead_replica(learner: tuple[CollectiveBroadcast, RunningServer], tmp_path: Path) -> None:
    publisher, server = learner
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = start_replica(server.address, "replica-a", log_a)
    b: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: publisher.replicas == ["replica-a"])
        for version in (1, 2, 3):
            publisher.publish(version, weights(version))
        wait_for(lambda: len(applied(log_a)) == 3)
        assert [u["version"] for u in applied(log_a)] == [1, 2, 3]

        # A late joiner first receives the current weights (version 3), not an empty model:
        # sent to it alone, from the snapshot; replica-a, which holds version 3, gets nothing.
        sent = publisher.sent_bytes
        nbytes = publisher._latest.nbytes  # type: ignore[union-attr]
        b = start_replica(server.address, "replica-b", log_b)
        wait_for(lambda: applied(log_b) != [])
        assert applied(log_b)[0] == {"version": 3, "digest": digest(weights(3))}
        assert publisher.replicas == ["replica-a", "replica-b"]
        assert publisher.sent_bytes - sent == nbytes

        sent = publisher.sent_bytes
        publisher.publish(4, weights(4))
        assert publisher.sent_bytes - sent == 2 * nbytes  # a new version: one broadcast to both
        a.kill()  # dies mid-run, without unregistering
        a.wait()
        # The dead replica costs a bounded wait (a failed broadcast or missing ack + one ready
        # timeout per rebuild, ~4 x timeout_s), never a hang: a hang detector, not a stopwatch.
        returns_within(60.0, lambda: [publisher.publish(v, weights(v)) for v in (5, 6)], "publish past a dead replica")
        assert publisher.replicas == ["replica-b"]
        wait_for(lambda: applied(log_b)[-1]["version"] == 6)
        for update in applied(log_b) + applied(log_a):
            assert update["digest"] == digest(weights(update["version"])), update["version"]
        assert [u["version"] for u in applied(log_b)] == [3, 4, 5, 6]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def test_a_killed_or_frozen_replica_is_dropped_by_its_heartbeat_not_the_long_timeout(tmp_path: Path) -> None:
    # timeout_s is long (a slow broadcast of a big model must fit in it); the heartbeat notices
    # a dead replica in dead_after_s instead of the ~2 x timeout_s a rebuild would wait for it.
    # timeout_s is 20 x dead_after_s, so the deadline below (half of timeout_s) is generous for
    # the heartbeat path on a loaded machine and still never reached by the timeout path.
    long_timeout, dead_after = 40.0, 2.0
    deadline = long_timeout / 2
    config = WeightSyncConfig(timeout_s=long_timeout, bucket_mb=0.05, heartbeat_s=0.2, dead_after_s=dead_after)
    publisher = CollectiveBroadcast(config)
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    logs = {n: tmp_path / f"{n}.jsonl" for n in ("a", "b", "c")}
    procs = {n: start_replica(server.address, n, logs[n], long_timeout, heartbeat_s=0.2) for n in logs}
    try:
        wait_for(lambda: publisher.replicas == ["a", "b", "c"])
        publisher.publish(1, weights(1))
        wait_for(lambda: all(applied(log) for log in logs.values()))

        procs["a"].kill()  # dies without unregistering
        procs["a"].wait()
        # ~dead_after_s: survivors abandon the broken broadcast when the rebuild is announced, and
        # the dead one is dropped by its heartbeat (before: timeout_s for the survivors, then
        # 2 x timeout_s + 1 more for the dead one).
        returns_within(deadline, lambda: publisher.publish(2, weights(2)), "the dead replica was waited for")
        assert publisher.replicas == ["b", "c"]

        procs["b"].send_signal(signal.SIGSTOP)  # alive but silent: stops beating
        # A frozen peer would hold the broadcast until its timeout: its stale heartbeat makes the
        # learner abandon the broadcast and drop it after ~dead_after_s.
        returns_within(deadline, lambda: publisher.publish(3, weights(3)), "the frozen replica was waited for")
        assert publisher.replicas == ["c"]
        wait_for(lambda: applied(logs["c"])[-1]["version"] == 3)
        procs["b"].send_signal(signal.SIGCONT)
        # Woken, it finds itself dropped, registers again and catches up.
        wait_for(lambda: publisher.replicas == ["b", "c"], timeout=2 * long_timeout)
        publisher.publish(4, weights(4))
        wait_for(lambda: applied(logs["b"])[-1]["version"] == 4, timeout=2 * long_timeout)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        publisher.close()
        server.stop(0)


def test_stop_unregisters_and_checks_names(learner: tuple[CollectiveBroadcast, RunningServer]) -> None:
    publisher, server = learner
    got: list[tuple[int, dict[str, torch.Tensor]]] = []

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        got.append((version, {n: t.clone() for n, t in named}))

    stop = threading.Event()
    cfg = WeightSyncConfig(timeout_s=TIMEOUT_S, checksum=True)
    thread = threading.Thread(target=run_subscriber, args=(server.address, "in-proc", apply, stop, cfg))
    thread.start()
    wait_for(lambda: publisher.replicas == ["in-proc"])
    publisher.publish(1, weights(1))
    wait_for(lambda: len(got) == 1)
    version, tensors = got[0]
    assert version == 1
    for name, tensor in weights(1):
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    wait_for(lambda: publisher.replicas == [])
    # a version must move forward
    with pytest.raises(ValueError, match="not newer"):
        publisher.publish(1, weights(1))


def test_manifest_rejects_a_model_mismatch() -> None:
    from asyncopd.weightsync.manifest import plan

    manifest = plan(weights(0), bucket_bytes=1 << 14)
    expected = {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in weights(0)}
    manifest.check_against(expected)
    expected["layer.0.b"] = ("float16", (97,))
    with pytest.raises(ManifestError, match=r"layer\.0\.b"):
        manifest.check_against(expected)


def test_bad_registrations_are_invalid_argument(learner: tuple[CollectiveBroadcast, RunningServer]) -> None:
    import grpc
    from asyncopd.wire.learner_client import LearnerClient
    from asyncopd.wire.rpc import channel

    publisher, server = learner
    with channel(server.address) as chan:
        client = LearnerClient(chan)
        for kwargs, needle in (
            ({"replica": ""}, "non-empty"),
            ({"replica": "r", "collective": False}, "address"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                client.register(**kwargs)  # type: ignore[arg-type]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in str(info.value.details())
        assert client.status().replicas == 0
    assert publisher.replicas == []


def test_a_replica_receives_every_bucket_into_the_same_two_buffers(
    learner: tuple[CollectiveBroadcast, RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two bucket buffers, allocated once and reused for every bucket of every update: the
    replica's extra memory is two buckets, not a model (12 buckets here)."""
    publisher, server = learner
    allocations: list[int] = []
    real = ReceiveBuffers._allocate

    def spy(self: ReceiveBuffers, nbytes: int) -> torch.Tensor:
        allocations.append(nbytes)
        return real(self, nbytes)

    monkeypatch.setattr(ReceiveBuffers, "_allocate", spy)

    def model(step: int) -> list[tuple[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(step)
        return [(f"layers.{i}.w", torch.randn(100, 100, generator=g)) for i in range(12)]  # 40 kB each

    storages: dict[int, set[int]] = {}
    loaded: dict[int, dict[str, torch.Tensor]] = {}

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:  # a load: copy each tensor before asking for the next
            storages.setdefault(version, set()).add(tensor.untyped_storage().data_ptr())
            loaded.setdefault(version, {})[name] = tensor.clone()

    stop = threading.Event()
    cfg = WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.05, checksum=True)
    thread = threading.Thread(target=run_subscriber, args=(server.address, "buffers", apply, stop, cfg))
    thread.start()
    try:
        wait_for(lambda: publisher.replicas == ["buffers"])
        for version in (1, 2):
            publisher.publish(version, model(version))
        wait_for(lambda: 2 in loaded and len(loaded[2]) == 12)
    finally:
        stop.set()
        thread.join(timeout=10)
    manifest = publisher._latest.manifest  # type: ignore[union-attr]
    assert len(manifest.bucket_sizes) == 12
    bucket = max(manifest.bucket_sizes)
    # one pair of buffers for both updates (no allocation per bucket or per version) ...
    assert len(allocations) == 2 and sum(allocations) <= 2 * bucket < manifest.total_bytes / 5, allocations
    assert len(storages[1]) == 2 and storages[1] == storages[2], storages
    # ... and reusing them corrupts nothing a load copied out in time
    for version in (1, 2):
        for name, tensor in model(version):
            assert torch.equal(loaded[version][name], tensor), (version, name)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_pipelined_publish_puts_each_bucket_on_the_wire_once_packed(
    pipeline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `pipeline`, bucket k is broadcast as soon as it is packed (k + 1 is packed while it
    travels); without it every bucket is packed first. Either way the replica loads exactly each
    version, and a publish leaves its snapshot whole (late joiners are served from it) even when
    no replica is there to send to."""
    from asyncopd.weightsync import groups, manifest

    events: list[str] = []
    real_new, real_post = manifest.new_bucket, groups.post

    def new_bucket(m: manifest.Manifest, index: int, device: torch.device | str) -> torch.Tensor:
        events.append(f"pack {index}")
        return real_new(m, index, device)

    def post(group: groups.Group, tensor: torch.Tensor, timeout_s: float) -> object:
        if threading.current_thread() is threading.main_thread():  # the learner's (the replica's thread posts too)
            events.append("post")
        return real_post(group, tensor, timeout_s)

    monkeypatch.setattr(manifest, "new_bucket", new_bucket)
    monkeypatch.setattr(groups, "post", post)

    def model(step: int) -> list[tuple[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(step)
        return [(f"layers.{i}.w", torch.randn(100, 100, generator=g)) for i in range(4)]  # a bucket each

    cfg = WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.05, checksum=False)
    publisher = CollectiveBroadcast(cfg)
    publisher.pipeline = pipeline
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    loaded: dict[int, dict[str, torch.Tensor]] = {}

    def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        loaded[version] = {name: tensor.clone() for name, tensor in named}

    stop = threading.Event()
    thread = threading.Thread(target=run_subscriber, args=(server.address, "pipelined", apply, stop, cfg))
    try:
        publisher.publish(1, model(1))  # nobody registered yet: nothing is sent, the snapshot is packed whole
        assert events == ["pack 0", "pack 1", "pack 2", "pack 3"]
        thread.start()
        wait_for(lambda: publisher.replicas == ["pipelined"] and 1 in loaded)
        events.clear()
        publisher.publish(2, model(2))
        wait_for(lambda: 2 in loaded)
    finally:
        stop.set()
        thread.join(timeout=10)
        publisher.close()
        server.stop(0)
    if pipeline:
        assert events == ["pack 0", "post", "pack 1", "post", "pack 2", "post", "pack 3", "post"]
    else:
        assert events == ["pack 0", "pack 1", "pack 2", "pack 3", "post", "post", "post", "post"]
    for version in (1, 2):
        for name, tensor in model(version):
            assert torch.equal(loaded[version][name], tensor), (version, name)


def flat_model(step: int) -> list[tuple[str, torch.Tensor]]:
    """Four tensors filled with `step`, one bucket each at bucket_mb=0.05."""
    return [(f"layers.{i}.w", torch.full((100, 100), float(step))) for i in range(4)]


def copy_failing_on_the_third(error: Exception) -> Callable[..., None]:
    """`manifest.copy_into` that raises `error` on its third call (packing fails in bucket 2)."""
    from asyncopd.weightsync import manifest

    real, calls = manifest.copy_into, [0]

    def copy(bucket: torch.Tensor, spec: manifest.TensorSpec, tensor: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise error
        real(bucket, spec, tensor)

    return copy


def test_a_pipelined_publish_whose_packing_fails_raises_that_error_and_keeps_the_last_whole_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Packing fails on the third bucket (a gather that raises, say): the publish raises that
    error, not a later one from finishing the snapshot, and the transport goes on serving the
    last snapshot that was packed whole; the next publish works."""
    from asyncopd.weightsync import manifest

    publisher = CollectiveBroadcast(WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.05, checksum=False))
    publisher.pipeline = True
    real, failing = manifest.copy_into, copy_failing_on_the_third(OSError("gather failed"))

    try:
        publisher.publish(1, flat_model(1))
        monkeypatch.setattr(manifest, "copy_into", failing)
        with pytest.raises(OSError, match="gather failed"):
            publisher.publish(2, flat_model(2))
        latest = publisher._latest
        assert latest is not None and latest.version == 1 and latest.whole
        assert all(bool((t == 1.0).all()) for _, t in latest.manifest.unpack(latest.buckets))
        monkeypatch.setattr(manifest, "copy_into", real)
        publisher.publish(3, flat_model(3))
        assert publisher._latest is not None and publisher._latest.version == 3 and publisher._latest.whole
    finally:
        publisher.close()


def test_a_packing_error_in_the_middle_of_a_pipelined_broadcast_fails_the_publish_not_the_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The third bucket's packing raises a RuntimeError (as a CUDA out-of-memory does) after two
    buckets went on the wire: the publish raises it (it is not taken for a broadcast failure and
    retried into a publish that reports success), the replica keeps version 1, and the next
    publish reaches it through a fresh group. (The replica is a process of its own: its abandoned
    receive stays in flight for the collective's timeout.)"""
    from asyncopd.weightsync import manifest

    publisher = CollectiveBroadcast(WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.05, checksum=False))
    publisher.pipeline = True
    server = start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, Progress))], [SERVICE_NAME])
    real, failing = manifest.copy_into, copy_failing_on_the_third(RuntimeError("out of memory"))

    log = tmp_path / "r.jsonl"
    replica = start_replica(server.address, "r", log)
    try:
        wait_for(lambda: publisher.replicas == ["r"])
        publisher.publish(1, flat_model(1))
        wait_for(lambda: len(applied(log)) == 1)
        monkeypatch.setattr(manifest, "copy_into", failing)
        with pytest.raises(RuntimeError, match="out of memory"):
            publisher.publish(2, flat_model(2))
        assert publisher._latest is not None and publisher._latest.version == 1
        monkeypatch.setattr(manifest, "copy_into", real)
        returns_within(60.0, lambda: publisher.publish(3, flat_model(3)), "the publish after a failed one")
        wait_for(lambda: applied(log)[-1]["version"] == 3)
        assert [(u["version"], u["digest"]) for u in applied(log)] == [(v, digest(flat_model(v))) for v in (1, 3)]
    finally:
        replica.send_signal(signal.SIGTERM)
        replica.wait(timeout=30)
        publisher.close()
        server.stop(0)
