"""Learner -> rollout weight broadcast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncopd.config.base import Section


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
    checksum: bool = Field(False, description="Verify a checksum of every update on the replica.")
    store_port: int = Field(0, ge=0, le=65535, description="TCPStore port the learner hosts; 0 = free port.")
    advertise_host: str | None = Field(
        None,
        description="Host replicas dial for the store; default learner.server.host (this machine's FQDN when 0.0.0.0).",
    )
    grpc_chunk_mb: float = Field(4.0, gt=0, description="Largest WeightChunk of the gRPC fallback transport, in MiB.")
