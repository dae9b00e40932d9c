"""gRPC plumbing every service shares: servers with health checking, deliberate message
limits and optional (mutual) TLS with per-method authorisation (`wire/authz.py`); client
channels to match; and the mapping of domain errors to status codes so servicers stay thin; and
how a client loop rides through a server it cannot reach (`retryable`, `Outage`).

It knows nothing about any particular service.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.security import TLSConfig
from asyncopd.wire.authz import Authorizer
from asyncopd.wire.errors import WireError

log = logging.getLogger(__name__)

_MIB = 1 << 20


class ResourceExhausted(RuntimeError):
    """A request that is well-formed but cannot be taken now (e.g. the cache is full)."""


class FailedPrecondition(RuntimeError):
    """A request that is well-formed but does not fit the current state (e.g. an unknown batch)."""


class PermissionDenied(RuntimeError):
    """A request the caller's identity may not make on this object (e.g. removing another caller's registration)."""


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
    """Create, register and start a server with health checking; returns the bound port.

    With TLS on, every call is authorised by the caller's role (`wire/authz.py`); with TLS off
    there is no identity to authorise, so every peer may call every method (local runs only).
    """
    secure = tls is not None and tls.enabled
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        options=_options(config.max_message_mb),
        interceptors=[Authorizer()] if secure else None,
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if secure:
        assert tls is not None
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
    if secure:
        log.info("gRPC server listening on %s:%d (mutual TLS, per-method authorisation on)", config.host, port)
    else:
        log.warning(
            "gRPC server listening on %s:%d without TLS: authorisation is OFF, any peer may call any method "
            "(fine for a local run; set tls.enabled for anything reachable by others)",
            config.host,
            port,
        )
    return running


# Clients spread their RPCs over every address the target resolves to (round_robin), instead of
# pinning one HTTP/2 connection to the first (pick_first): several cache replicas behind a
# headless Service (`dns:///<name>:<port>`, one A record per pod) then share the load. A target
# with one address behaves as before.
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel(address: str, max_message_mb: int = 64, tls: TLSConfig | None = None) -> grpc.Channel:
    """A client channel with the same message limits (and TLS material) as the servers, balanced
    round-robin over the addresses `address` resolves to."""
    options = [*_options(max_message_mb), ("grpc.service_config", _ROUND_ROBIN)]
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


@dataclass
class Outage:
    """A client loop's view of a server it cannot reach (retryable errors): how long to wait
    before the next try, and what to log.

    The wait doubles from `first_delay_s` up to `max_delay_s`, so a restarted server is found
    within `max_delay_s` of serving again. The first failure is logged as a warning, then one
    line every `report_every_s` while it lasts, and one line when the server answers again:
    a long outage is a few lines in the log, not one per try.
    """

    what: str
    first_delay_s: float = 0.05
    max_delay_s: float = 0.5
    report_every_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0  # retryable failures seen, over all outages
    _since: float | None = None
    _delay: float = 0.0
    _reported: float = 0.0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, err: grpc.RpcError, during: str = "") -> float:
        """Note one retryable failure (of the call named `during`); returns the seconds to wait
        before the next try."""
        now = self.clock()
        self.failures += 1
        code = getattr(err.code(), "name", err.code())  # type: ignore[attr-defined]
        if self._since is None:
            self._since = self._reported = now
            self._delay = self.first_delay_s
            on = f" on {during}" if during else ""
            log.warning("%s unreachable (%s%s); retrying every <= %.1fs", self.what, code, on, self.max_delay_s)
        else:
            self._delay = min(self._delay * 2, self.max_delay_s)
            if now - self._reported >= self.report_every_s:
                self._reported = now
                log.warning("%s still unreachable after %.0fs (%s)", self.what, now - self._since, code)
        return self._delay

    def ok(self) -> None:
        """The server answered: end the outage (logged once, with its length)."""
        if self._since is not None:
            log.info("%s reachable again after %.1fs", self.what, self.clock() - self._since)
            self._since = None


F = TypeVar("F", bound=Callable[..., Any])


def status_errors(method: F) -> F:
    """Servicer method decorator: domain errors become gRPC status codes with their message.

    WireError/ValueError -> INVALID_ARGUMENT, ResourceExhausted -> RESOURCE_EXHAUSTED,
    FailedPrecondition -> FAILED_PRECONDITION, PermissionDenied -> PERMISSION_DENIED. Anything
    else propagates (INTERNAL, logged).
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
        except PermissionDenied as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    return wrapper  # type: ignore[return-value]
