"""`python -m asyncopd.observability.health_probe`, the chart's exec probe when TLS is on, against real gRPC
servers (plain and mutual TLS) on loopback, with certificates made by the openssl CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.security import TLSConfig
from asyncopd.observability.health_probe import check
from asyncopd.wire import rpc
from required_tools import require_tool

pytestmark = pytest.mark.service

SERVICE_DNS = "rel-asyncopd-cache"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{SERVICE_DNS}\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={SERVICE_DNS}")
    run(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "1", "-extfile", "ext.cnf",
    )  # fmt: skip
    return d


@pytest.fixture
def plain_server() -> Iterator[rpc.RunningServer]:
    server = rpc.start_server(ServerConfig(port=0), [], ["asyncopd.v1.CacheService"])
    yield server
    server.stop(grace=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plain_serving_and_not_serving(plain_server: rpc.RunningServer) -> None:
    kw = dict(server_name=None, ca=None, cert=None, key=None)
    assert check(plain_server.port, **kw) is True
    assert check(plain_server.port, service="asyncopd.v1.CacheService", **kw) is True
    plain_server.set_serving("asyncopd.v1.CacheService", False)
    assert check(plain_server.port, **kw) is False
    assert check(_free_port(), timeout_s=0.5, **kw) is False


def test_mutual_tls_probe(pki: Path) -> None:
    tls = TLSConfig(
        enabled=True,
        cert_file=str(pki / "tls.crt"),
        key_file=str(pki / "tls.key"),
        ca_file=str(pki / "ca.crt"),
        require_client_cert=True,
    )
    server = rpc.start_server(ServerConfig(port=0), [], ["asyncopd.v1.CacheService"], tls)
    try:
        files = dict(ca=str(pki / "ca.crt"), cert=str(pki / "tls.crt"), key=str(pki / "tls.key"))
        assert check(server.port, server_name=SERVICE_DNS, **files) is True
        # the certificate does not name 127.0.0.1: without the Service name the handshake fails
        assert check(server.port, server_name="someone-else", timeout_s=1, **files) is False
        # mutual TLS: no client certificate, no answer
        assert check(server.port, server_name=SERVICE_DNS, ca=files["ca"], cert=None, key=None, timeout_s=1) is False
        # plain gRPC (the kubelet's own grpc probe) cannot reach a TLS server: why the chart execs this
        assert check(server.port, server_name=None, ca=None, cert=None, key=None, timeout_s=1) is False
        # and the module runs as the chart invokes it
        cmd = [
            sys.executable,
            "-m",
            "asyncopd.observability.health_probe",
            "--port",
            str(server.port),
            "--server-name",
            SERVICE_DNS,
        ]
        cmd += ["--ca", files["ca"], "--cert", files["cert"], "--key", files["key"]]
        assert subprocess.run(cmd, check=False, capture_output=True, timeout=60).returncode == 0
    finally:
        server.stop(grace=None)
