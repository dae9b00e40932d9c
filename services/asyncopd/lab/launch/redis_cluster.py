"""A local Redis Cluster of masters only, started from the `redis-server` binary, stopped by handle.

Tests (`tests/service/test_cache_cluster.py`) and `asyncopd bench cache --shards` run the cache
on it: N cluster-enabled servers on free loopback ports, each in its own directory, without
persistence, joined by `redis-cli --cluster create` (no replicas). `spread_prefix` picks a run
key prefix whose cache shards' hash tags land on different masters, so each shard has a master
to itself.

It knows how to start and join Redis servers and where the cache's hash tags land
(`payload.shard_prefix`); it knows nothing else about the cache's keys.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType

import redis

from asyncopd.lab.launch.ports import free_ports
from asyncopd.wire import payload


class LocalCluster:
    """`masters` cluster-enabled redis-servers (masters only) on free ports under `workdir`.

    `maxmemory` caps each master (noeviction, as the cache requires); `exe` and `cli` default to
    `redis-server` and `redis-cli` on PATH. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        workdir: Path,
        masters: int = 3,
        maxmemory: str = "64mb",
        exe: str | None = None,
        cli: str | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        exe, cli = exe or shutil.which("redis-server"), cli or shutil.which("redis-cli")
        if exe is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli must be on PATH (deploy/dev/sysdeps.sh installs them)")
        self.exe, self.cli = exe, cli
        self.workdir = workdir
        self.maxmemory = maxmemory
        ports = free_ports(2 * masters)  # client ports, then cluster-bus ports
        self.ports, self._bus_ports = ports[:masters], ports[masters:]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A seed URL of the cluster (any master; a cluster client discovers the rest)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalCluster:
        for port, bus in zip(self.ports, self._bus_ports, strict=True):
            d = self.workdir / str(port)
            d.mkdir(parents=True)
            args = [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", ""]
            args += ["--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-port", str(bus), "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            for port in self.ports:
                self._wait(partial(_answers, port))
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(
                [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            for port in self.ports:
                self._wait(partial(_cluster_ok, port))
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _wait(check: Callable[[], object], deadline_s: float = 20.0) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                if check():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the local Redis Cluster did not come up")
            time.sleep(0.1)

    def cpu_seconds(self) -> list[float]:
        """Each master's CPU seconds so far (user + system, from INFO cpu), in `ports` order."""
        out = []
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                info = client.info("cpu")
            finally:
                client.close()
            out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port)
    try:
        return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()


def spread_prefix(node_of: Callable[[str], str], base: str, shards: int, tries: int = 1000) -> str:
    """A run key prefix `<base>-<random>` whose `shards` cache shards (`payload.shard_prefix`) hash
    to `shards` different nodes; `node_of(key)` names the node holding a key (for a cluster
    client: `client.get_node_from_key(key).name`). Raises when no such prefix turns up in `tries`
    (fewer nodes than shards)."""
    for _ in range(tries):
        prefix = f"{base}-{uuid.uuid4().hex[:8]}"
        if len({node_of(payload.shard_prefix(prefix, i)) for i in range(shards)}) == shards:
            return prefix
    raise ValueError(f"no key prefix in {tries} tries puts {shards} shards on {shards} different nodes")
