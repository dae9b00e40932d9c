"""The optional local Prometheus that `asyncopd run --prometheus` starts.

Every service always serves /metrics; its port is its own `server.metrics_port`.
"""

from __future__ import annotations

from pydantic import Field

from asyncopd.config.base import Section


class MetricsConfig(Section):
    """The local Prometheus of a local run."""

    prometheus_binary: str = Field(
        "prometheus", min_length=1, description="Prometheus server executable for local runs (PATH or a path)."
    )
    prometheus_port: int = Field(
        0, ge=0, le=65535, description="Port of the local Prometheus web UI/API; 0 picks a free port."
    )
    scrape_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often the local Prometheus scrapes each service, in seconds."
    )
