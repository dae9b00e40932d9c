"""Metrics export and the optional local Prometheus that `asyncopd run --prometheus` starts.

Each service's /metrics port lives in its own `server.metrics_port`; this section holds what is
shared by all of them.
"""

from __future__ import annotations

from pydantic import Field

from asyncopd.config.base import Section


class MetricsConfig(Section):
    """Prometheus export of every service, and the local Prometheus of a local run."""

    enabled: bool = Field(True, description="Serve /metrics on each service's server.metrics_port.")
    process_metrics: bool = Field(True, description="Also export process_* series (CPU, RSS, fds) per service.")
    prometheus_binary: str = Field(
        "prometheus", min_length=1, description="Prometheus server executable for local runs (PATH or a path)."
    )
    prometheus_port: int = Field(
        0, ge=0, le=65535, description="Port of the local Prometheus web UI/API; 0 picks a free port."
    )
    scrape_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often the local Prometheus scrapes each service, in seconds."
    )
