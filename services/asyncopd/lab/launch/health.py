"""Waiting for a started service to answer the standard gRPC health check (grpc.health.v1).

While it waits it watches the child process, so a service that crashes at start-up is
reported at once with its log instead of after the timeout. It knows gRPC health checking
and the child handle; nothing about what the service does.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncopd.config.security import TLSConfig
from asyncopd.lab.launch.processes import ChildDied, ChildProcess
from asyncopd.wire import rpc


def check_serving(address: str, service: str = "", tls: TLSConfig | None = None, timeout_s: float = 1.0) -> bool:
    """One health check: True when the server at `address` says SERVING for `service`."""
    ch = rpc.channel(address, tls=tls)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        ch.close()


def wait_serving(
    address: str,
    child: ChildProcess | None,
    timeout_s: float,
    *,
    tls: TLSConfig | None = None,
    service: str = "",
    poll_s: float = 0.2,
) -> float:
    """Block until `address` is SERVING; returns the seconds it took.

    Raises ChildDied if `child` exits first, TimeoutError after `timeout_s`.
    """
    start = time.monotonic()
    while True:
        if child is not None and not child.alive():
            raise ChildDied(child.name, child.returncode, child.log_path, child.tail())
        if check_serving(address, service, tls):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            name = child.name if child is not None else address
            tail = child.tail() if child is not None else ""
            raise TimeoutError(f"{name} at {address} was not SERVING after {timeout_s:.0f}s; last log lines:\n{tail}")
        time.sleep(poll_s)
