"""`python -m asyncopd.observability.health_probe`: check a local gRPC server's health service over (m)TLS.

The kubelet's native `grpc:` probe cannot speak TLS, so with TLS on the Helm chart runs this
as an exec probe instead. It asks the standard `grpc.health.v1.Health/Check` of the server on
127.0.0.1:PORT, verifying the server certificate for `--server-name` (the Service DNS name the
certificate carries) and presenting the pod's own certificate (mutual TLS). Exit status 0 =
SERVING, 1 = anything else. It imports only grpc, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    port: int,
    *,
    server_name: str | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    service: str = "",
    timeout_s: float = 3.0,
) -> bool:
    """True when the server on 127.0.0.1:port reports SERVING for `service` ("" = overall)."""
    address = f"127.0.0.1:{port}"
    if ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            print(f"health check of {address} failed: {err.code().name} {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asyncopd.observability.health_probe", description=__doc__.splitlines()[0]
    )
    p.add_argument("--port", type=int, required=True, help="gRPC port of the server on 127.0.0.1")
    p.add_argument("--service", default="", help="health service name ('' = the server as a whole)")
    p.add_argument("--server-name", default=None, help="name to verify the server certificate against")
    p.add_argument("--ca", default=None, help="PEM CA bundle (enables TLS)")
    p.add_argument("--cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", default=None, help="PEM client key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    ok = check(
        args.port,
        server_name=args.server_name,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        service=args.service,
        timeout_s=args.timeout,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
