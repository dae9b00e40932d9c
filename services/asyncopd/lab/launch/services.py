"""The `asyncopd serve` children of a local run: started from the run's one config file, waited
for until they answer their gRPC health check, added or restarted mid-run (fault injection).

Each child is a `python -m asyncopd.cli serve SERVICE -c CONFIG --name NAME [--set ...]` under
the run's `Supervisor`; its address and metrics URL are remembered as it starts, and
`processes.json` (pid and log of every child) is rewritten whenever the children change. It
knows how a service is started and reached; nothing about what it does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from asyncopd.config.security import TLSConfig
from asyncopd.lab.launch.health import wait_serving
from asyncopd.lab.launch.ports import free_port
from asyncopd.lab.launch.processes import ChildProcess, Supervisor

REPLICATED = ("rollout", "teacher")


def port_overrides(service: str, port: int, metrics_port: int) -> list[str]:
    """The `--set` items that put one replica on its own ports (the config file names one)."""
    return [f"{service}.server.port={port}", f"{service}.server.metrics_port={metrics_port}"]


class Services:
    """Starts, waits for and restarts the run's service children by name."""

    def __init__(
        self,
        supervisor: Supervisor,
        config_path: Path,
        tls: TLSConfig,
        *,
        python: str,
        startup_timeout_s: float,
        process_table: Path,
    ) -> None:
        self.supervisor = supervisor
        self.config_path = config_path
        self.tls = tls
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.process_table = process_table
        self.addresses: dict[str, str] = {}  # child name -> gRPC address
        self.metrics_urls: dict[str, str] = {}  # child name -> /metrics URL

    def start(
        self, service: str, name: str, port: int, metrics_port: int, overrides: Sequence[str] = ()
    ) -> ChildProcess:
        """Start one child (not waiting for it); `port`/`metrics_port` are where it will serve."""
        argv = [self.python, "-m", "asyncopd.cli", "serve", service, "-c", str(self.config_path), "--name", name]
        for item in overrides:
            argv += ["--set", item]
        child = self.supervisor.start(name, argv)
        self.addresses[name] = f"127.0.0.1:{port}"
        self.metrics_urls[name] = f"http://127.0.0.1:{metrics_port}/metrics"
        self.write_process_table()
        return child

    def wait(self, name: str) -> ChildProcess:
        """Block until child `name` answers its health check (ChildDied if it exits first)."""
        child = self.supervisor.child(name)
        wait_serving(self.addresses[name], child, self.startup_timeout_s, tls=self.tls)
        return child

    def start_replicas(self, service: str, ports: Sequence[int], metrics_ports: Mapping[str, int]) -> None:
        """Start `service-0..n-1` at once, then wait for each (they load their models in parallel)."""
        names = [f"{service}-{i}" for i in range(len(ports))]
        for name, port in zip(names, ports, strict=True):
            self.start(service, name, port, metrics_ports[name], port_overrides(service, port, metrics_ports[name]))
        for name in names:
            self.wait(name)

    def add_replica(self, service: str) -> ChildProcess:
        """Start one more `rollout` or `teacher` replica on new ports; returns it once serving."""
        if service not in REPLICATED:
            raise ValueError(f"cannot add a {service!r} replica (only {'/'.join(REPLICATED)})")
        taken = {c.name for c in self.supervisor.children}
        index = next(i for i in range(len(taken) + 1) if f"{service}-{i}" not in taken)
        name = f"{service}-{index}"
        port, metrics_port = free_port(), free_port()
        while metrics_port == port:
            metrics_port = free_port()
        self.start(service, name, port, metrics_port, port_overrides(service, port, metrics_port))
        return self.wait(name)

    def restart(self, name: str) -> ChildProcess:
        """Start a stopped/killed child again with its own argv (same ports); wait until it serves."""
        child = self.supervisor.restart(name)
        self.write_process_table()
        # A child without a gRPC health check (Redis) is waited for by the caller.
        if name in self.addresses:
            self.wait(name)
        return child

    def write_process_table(self) -> None:
        """`processes.json`: each child's pid and log, for whoever needs to look at one."""
        table = [{"name": c.name, "pid": c.pid, "log": str(c.log_path)} for c in self.supervisor.children]
        self.process_table.write_text(json.dumps(table, indent=2) + "\n")
