"""Where each service listens and how to reach the others (local loopback by default)."""

from __future__ import annotations

from pydantic import Field

from asyncopd.config.base import Section


class ServerConfig(Section):
    """A gRPC server's bind address and limits."""

    host: str = Field("127.0.0.1", description="Bind address; loopback by default, 0.0.0.0 in a pod.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port (local runs/tests).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")
    max_message_mb: int = Field(64, ge=1, le=2047, description="Largest gRPC message accepted or sent, in MiB.")
    workers: int = Field(8, ge=1, le=4096, description="Thread pool size of the gRPC server.")


class CacheServerConfig(ServerConfig):
    """The cache's gRPC server: every client waiting at the cache holds one of its threads."""

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port (local runs/tests).")
    workers: int = Field(
        512,
        ge=1,
        le=4096,
        description="Thread pool size of the cache's gRPC server. A waiting AcquirePrompts/ClaimRollouts/PullBatch "
        "holds a thread for its wait, so keep it above the rollout replicas + teachers + learner ranks one cache "
        "process serves (all but a reserve of workers/8, 2 to 32, may wait; further waits are answered at once and "
        "counted in asyncopd_cache_waits_cut_total). Idle threads cost memory, not CPU; they start on demand.",
    )


class EndpointsConfig(Section):
    """Addresses the services use to reach each other (host:port)."""

    cache: str = Field("127.0.0.1:50051", description="Cache service gRPC address.")
    learner: str = Field("127.0.0.1:50054", description="Learner service gRPC address.")
