"""Learner -> rollout weight broadcast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncopd.config.base import Section

# The environment variable holding the key the weight-sync store's values are signed with
# (asyncopd.weightsync.groups.Signer): the chart sets it from a Secret, the local launcher makes
# one per run. Unset: unsigned (a warning; local toy runs only).
WEIGHTSYNC_KEY_ENV = "ASYNCOPD_WEIGHTSYNC_KEY"


class WeightSyncConfig(Section):
    """How new weights reach the rollout replicas."""

    transport: Literal["collective", "grpc"] = Field(
        "collective", description="collective = torch.distributed broadcast; grpc = streaming fallback."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto = nccl on CUDA, gloo on CPU."
    )
    bucket_mb: float = Field(64.0, gt=0, description="Size of one broadcast bucket, in MiB.")
    timeout_s: float = Field(30.0, gt=0, description="A replica slower than this is dropped from the group.")
    heartbeat_s: float = Field(
        0.5, gt=0, description="How often a replica bumps its heartbeat counter in the learner's store."
    )
    dead_after_s: float = Field(
        5.0,
        gt=0,
        description=(
            "A replica whose heartbeat stood still this long is dropped at once when the learner waits on it "
            "(instead of after timeout_s, which must cover a slow broadcast)."
        ),
    )
    max_replicas: int = Field(
        256,
        ge=1,
        description=(
            "Most replicas registered for weight sync at once (both kinds); a registration beyond it is refused "
            "(RESOURCE_EXHAUSTED), so a misbehaving client cannot grow the group or the push list without bound."
        ),
    )
    checksum: bool = Field(False, description="Verify a checksum of every update on the replica.")
    delta: bool = Field(
        False,
        description=(
            "Send each update as the 16-bit words (bf16 elements) changed since the previous published version, "
            "per bucket as sparse indices or a bitmask when smaller than the bucket, else dense. Collective transport "
            "only. Costs one extra copy of the model on every replica (the version a delta applies to); late "
            "joiners and replicas that missed a version get a dense update."
        ),
    )
    store_port: int = Field(0, ge=0, le=65535, description="TCPStore port the learner hosts; 0 = free port.")
    advertise_host: str | None = Field(
        None,
        description="Host replicas dial for the store; default learner.server.host (this machine's FQDN when 0.0.0.0).",
    )
    grpc_chunk_mb: float = Field(4.0, gt=0, description="Largest WeightChunk of the gRPC fallback transport, in MiB.")

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> WeightSyncConfig:
        if self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"weightsync.dead_after_s ({self.dead_after_s}) must be at least 2 x weightsync.heartbeat_s "
                f"({self.heartbeat_s}), or live replicas would be dropped between two heartbeats"
            )
        return self

    @model_validator(mode="after")
    def _delta_needs_collective(self) -> WeightSyncConfig:
        if self.delta and self.transport != "collective":
            raise ValueError(
                "weightsync.delta applies to the collective transport only (the gRPC push sends whole snapshots): "
                "set weightsync.transport=collective or weightsync.delta=false"
            )
        return self
