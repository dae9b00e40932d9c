"""Transport security of a real cache service: mutual TLS refuses clients without a valid
certificate (none, one from another CA, plaintext), and the Redis password never shows up in
the service's logs, its /metrics page or its Stats."""

from __future__ import annotations

import logging
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from asyncopd.cache.main import start_cache
from asyncopd.config import config_from_dict
from asyncopd.config.security import TLSConfig
from asyncopd.v1 import cache_pb2, cache_pb2_grpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from required_tools import require_tool
from test_cache_harness import SHARED_REDIS, VOCAB, PrivateRedis, tiny_prompts, tokenize, unique_prefix, wipe

pytestmark = pytest.mark.service


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)  # fmt: skip


def make_cert(d: Path, ca: str, name: str, san: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")  # a missing openssl fails under CI rather than skipping the refusal tests
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "ca", "client", "DNS:client")
    make_cert(d, "rogue-ca", "rogue", "DNS:client")
    return d


def tls(d: Path, who: str, ca: str = "ca") -> TLSConfig:
    return TLSConfig(
        enabled=True, cert_file=str(d / f"{who}.crt"), key_file=str(d / f"{who}.key"), ca_file=str(d / f"{ca}.crt")
    )


@pytest.fixture(scope="module")
def mtls_cache(pki: Path) -> Iterator[str]:
    prefix = unique_prefix("tls")
    config = config_from_dict(
        {
            "redis": {"url": SHARED_REDIS, "key_prefix": prefix},
            "cache": {"server": {"port": 0}},
            "tls": tls(pki, "server").model_dump(),
        }
    )
    cache = start_cache(
        config, "cache-tls", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB, serve_metrics=False
    )
    try:
        yield cache.address
    finally:
        cache.stop(grace=0.5)
        wipe(SHARED_REDIS, prefix)


def stats(ch: grpc.Channel) -> cache_pb2.StatsResponse:
    return cache_pb2_grpc.CacheServiceStub(ch).Stats(cache_pb2.StatsRequest(), timeout=10)


def assert_refused(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stats(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value  # the handshake fails
    ch.close()


def test_a_client_with_a_valid_certificate_is_served(mtls_cache: str, pki: Path) -> None:
    ch = channel(mtls_cache, tls=tls(pki, "client"))
    try:
        assert CacheClient(ch).stats_snapshot().invariant_holds()
        assert stats(ch).max_staleness >= 0
    finally:
        ch.close()


def test_a_tls_client_without_a_certificate_is_refused(mtls_cache: str, pki: Path) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    assert_refused(grpc.secure_channel(mtls_cache, creds))


def test_a_client_certificate_from_another_ca_is_refused(mtls_cache: str, pki: Path) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "rogue.key").read_bytes(),
        certificate_chain=(pki / "rogue.crt").read_bytes(),
    )
    assert_refused(grpc.secure_channel(mtls_cache, creds))


def test_a_plaintext_client_is_refused(mtls_cache: str) -> None:
    assert_refused(grpc.insecure_channel(mtls_cache))


def test_the_redis_password_never_appears_in_logs_metrics_or_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    password = "s3cret-Pw-" + unique_prefix("pw")[-10:]
    server = PrivateRedis(tmp_path, password=password).start()
    monkeypatch.setenv("ASYNCOPD_REDIS_PASSWORD", password)
    caplog.set_level(logging.DEBUG)
    try:
        config = config_from_dict(
            {
                "redis": {"url": server.url, "key_prefix": "pw"},
                "cache": {"server": {"port": 0, "metrics_port": 0}, "hold_until_learner": False},
            }
        )
        assert config.redis.password is not None and config.redis.password.get_secret_value() == password
        assert password not in repr(config) and password not in str(config.model_dump())
        cache = start_cache(config, "cache-pw", prompts=tiny_prompts(), tokenize=tokenize, vocab_size=VOCAB)
        try:
            ch = channel(cache.address)
            client = CacheClient(ch)
            prompts, _, _ = client.acquire_prompts("r0", 2)
            assert prompts, "the cache reached the password-protected Redis"
            snapshot = stats(ch)
            ch.close()
            assert cache.metrics_server is not None
            with urllib.request.urlopen(cache.metrics_server.url, timeout=10) as resp:
                page = resp.read().decode()
            assert "asyncopd" in page
        finally:
            cache.stop(grace=0.5)
        exposed = {"logs": caplog.text, "metrics": page, "stats": str(snapshot), "config": config.model_dump_json()}
        for where, text in exposed.items():
            assert password not in text, f"the Redis password leaked into {where}"
    finally:
        server.stop()
