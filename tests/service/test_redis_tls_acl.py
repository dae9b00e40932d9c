"""The cache service against a Redis that speaks only TLS and knows the service as an ACL user:
a `rediss://` URL verified with the configured CA, the configured username actually used to
log in (the default user has another password), and a server certificate from another CA or a
wrong password refused rather than silently accepted.

The Redis is our own `redis-server` on a free port (`--port 0 --tls-port N`), with certificates
made by the openssl CLI; nothing else is reachable on it without TLS.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from asyncopd.cache.main import start_cache
from asyncopd.cache.store import CacheUnavailable
from asyncopd.config import RunConfig
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from required_tools import require_tool
from test_cache_harness import (
    VOCAB,
    free_port,
    make_config,
    make_rollout,
    make_scores,
    tiny_prompts,
    tokenize,
    unique_prefix,
)

pytestmark = pytest.mark.service

ADMIN_PASSWORD = "admin-pw-5b1e"
USER = "opd-cache"
USER_PASSWORD = "cache-pw-93c0"


@dataclass(frozen=True)
class TlsRedis:
    port: int
    pki: Path
    prefix: str

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.pki / "ca.crt"), password=ADMIN_PASSWORD
        )


def _pki(d: Path) -> Path:
    openssl = require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.crt")  # fmt: skip
    for name, ca in (("server", "ca"),):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")  # fmt: skip
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip
    return d


def _start(pki: Path, cert: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = require_tool("redis-server")
    port = free_port()
    args = [
        exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(pki / f"{cert}.crt"), "--tls-key-file", str(pki / f"{cert}.key"),
        "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    pki = _pki(tmp_path_factory.mktemp("redis-pki"))
    proc, port = _start(pki, "server", tmp_path_factory.mktemp("redis-tls"))
    server = TlsRedis(port, pki, unique_prefix("tlsacl"))
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(
                    f"redis-server with --tls-port exited ({proc.returncode}; built without TLS?):\n{out[-2000:]}"
                )
            try:
                boot = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(pki / "ca.crt"))
                boot.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server with TLS did not answer in 20 s"
                time.sleep(0.1)
        # The service's own user may touch only its run's keys; the default user gets another
        # password, so logging in without the username (with the user's password) fails.
        boot.execute_command(
            "ACL", "SETUSER", USER, "on", f">{USER_PASSWORD}", f"~{server.prefix}:*", f"&{server.prefix}:*", "+@all"
        )
        boot.execute_command("ACL", "SETUSER", "default", "resetpass", f">{ADMIN_PASSWORD}")
        boot.close()
        yield server
    finally:
        _stop(proc)


def cache_config(server: TlsRedis, *, ca: str = "ca", password: str = USER_PASSWORD, **values: object) -> RunConfig:
    return make_config(
        server.prefix,
        server.url,
        **{
            "redis.username": USER,
            "redis.password": password,
            "redis.tls_ca_file": str(server.pki / f"{ca}.crt"),
            "cache.redis_retry_s": 1.0,
            **values,
        },
    )


def test_plain_redis_is_not_served_on_the_tls_port(tls_redis: TlsRedis) -> None:
    plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=3, socket_connect_timeout=3)
    with pytest.raises(redis.RedisError):
        plain.ping()
    plain.close()


def test_the_cache_serves_over_rediss_as_its_acl_user(tls_redis: TlsRedis) -> None:
    config = cache_config(tls_redis, max_staleness=0, **{"learner.batch_size": 2})
    cache = start_cache(config, "cache-tls-acl", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB,
                        serve_metrics=False)  # fmt: skip
    ch = channel(cache.address)
    admin = tls_redis.admin()
    try:
        client = CacheClient(ch, timeout_s=30.0)
        prompts, _, _ = client.acquire_prompts("r0", 2)
        assert len(prompts) == 2
        rollouts = [make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]
        client.put_rollouts(rollouts)
        claimed = client.claim_rollouts("t0", 2)
        client.put_scores([make_scores(r) for r in claimed])
        batch = client.pull_batch(2, 0)
        assert batch is not None and client.ack_batch(batch.batch_id) == 2
        assert client.stats_snapshot().trained == 2
        # Who the service logged in as, from the server's side (CLIENT LIST names each
        # connection's user); and every key it wrote is under its prefix.
        users = {c["user"] for c in admin.client_list() if c.get("user") != "default"}
        assert users == {USER}, admin.client_list()
        assert admin.acl_log() == [], "the service was refused something by its ACL"
        keys = list(admin.scan_iter(match="*", count=1000))
        assert keys and all(k.decode().startswith(tls_redis.prefix + ":") for k in keys)
    finally:
        ch.close()
        cache.stop(grace=0.5)
        admin.close()


def test_a_server_certificate_from_another_ca_is_refused(tls_redis: TlsRedis) -> None:
    with pytest.raises(CacheUnavailable, match=r"(?i)certificate|ssl"):
        start_cache(cache_config(tls_redis, ca="rogue-ca"), "cache-rogue", prompts=tiny_prompts(), tokenize=tokenize,
                    vocab_size=VOCAB, serve_metrics=False)  # fmt: skip


def test_a_wrong_password_for_the_acl_user_is_refused(tls_redis: TlsRedis) -> None:
    with pytest.raises(redis.AuthenticationError):
        start_cache(cache_config(tls_redis, password=ADMIN_PASSWORD), "cache-wrongpw", prompts=tiny_prompts(),
                    tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False)  # fmt: skip
