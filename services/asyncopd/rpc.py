"""gRPC plumbing every service shares: servers with health checking, deliberate message
limits and optional (mutual) TLS; client channels to match; and the mapping of domain errors
to status codes so servicers stay thin.

It knows nothing about any particular service.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.security import TLSConfig
from asyncopd.wire.errors import WireError

log = logging.getLogger(__name__)

_MIB = 1 << 20


class ResourceExhausted(RuntimeError):
    """A request that is well-formed but cannot be taken now (e.g. the cache is full)."""


class FailedPrecondition(RuntimeError):
    """A request that is well-formed but does not fit the current state (e.g. an unknown batch)."""


def _options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * _MIB
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass
class RunningServer:
    """A started gRPC server and the port it actually bound (port 0 picks one)."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service, status)
        self.health.set("", status)

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(
    config: ServerConfig,
    register: Iterable[Callable[[grpc.Server], None]],
    service_names: Iterable[str],
    tls: TLSConfig | None = None,
) -> RunningServer:
    """Create, register and start a server with health checking; returns the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers), options=_options(config.max_message_mb)
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if tls is not None and tls.enabled:
        key, cert = _read(tls.key_file), _read(tls.cert_file)
        if key is None or cert is None:
            raise ValueError("tls.enabled needs tls.key_file and tls.cert_file")
        creds = grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=_read(tls.ca_file),
            require_client_auth=tls.require_client_cert,
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    server.start()
    running = RunningServer(server=server, port=port, health=health_servicer)
    for name in service_names:
        running.set_serving(name, True)
    log.info("gRPC server listening on %s:%d", config.host, port)
    return running


def channel(address: str, max_message_mb: int = 64, tls: TLSConfig | None = None) -> grpc.Channel:
    """A client channel with the same message limits (and TLS material) as the servers."""
    options = _options(max_message_mb)
    if tls is not None and tls.enabled:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca_file),
            private_key=_read(tls.key_file),
            certificate_chain=_read(tls.cert_file),
        )
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


# A server that is (re)starting or overloaded answers with these: try again. Anything else is
# a real error to surface.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def retryable(err: grpc.RpcError) -> bool:
    """True for errors a client should retry with back-off (see RETRYABLE)."""
    return err.code() in RETRYABLE  # type: ignore[attr-defined]


F = TypeVar("F", bound=Callable[..., Any])


def status_errors(method: F) -> F:
    """Servicer method decorator: domain errors become gRPC status codes with their message.

    WireError/ValueError -> INVALID_ARGUMENT, ResourceExhausted -> RESOURCE_EXHAUSTED,
    FailedPrecondition -> FAILED_PRECONDITION. Anything else propagates (INTERNAL, logged).
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except (WireError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ResourceExhausted as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except FailedPrecondition as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    return wrapper  # type: ignore[return-value]
