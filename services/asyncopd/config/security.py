"""Transport security of the gRPC services (off locally, on in the chart's production values)."""

from __future__ import annotations

from pydantic import Field, model_validator

from asyncopd.config.base import Section


class TLSConfig(Section):
    """gRPC TLS / mutual TLS from certificate files (mounted from a Secret in Kubernetes)."""

    enabled: bool = Field(False, description="Serve and dial gRPC over TLS.")
    cert_file: str | None = Field(None, description="PEM certificate of this service.")
    key_file: str | None = Field(None, description="PEM private key of this service.")
    ca_file: str | None = Field(None, description="PEM CA that signs peers' certificates.")
    require_client_cert: bool = Field(True, description="Mutual TLS: refuse clients without a valid cert.")

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSConfig:
        if self.enabled:
            missing = [n for n in ("cert_file", "key_file", "ca_file") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"tls.enabled=true needs {', '.join(missing)} (PEM file paths)")
        return self
