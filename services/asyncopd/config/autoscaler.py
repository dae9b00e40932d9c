"""The rollout autoscaler: which Deployment it scales, its bounds and its damping.

Only meaningful in Kubernetes (`asyncopd serve autoscaler`); local runs ignore it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from asyncopd.config.base import Section
from asyncopd.config.endpoints import ServerConfig


class AutoscalerConfig(Section):
    """Scale rollout replicas up while the learner waits for data, down while admission blocks."""

    server: ServerConfig = Field(
        default_factory=lambda: ServerConfig(port=50055),
        description="gRPC server of the autoscaler (health checking only) and its /metrics port.",
    )
    namespace: str | None = Field(
        None, description="Namespace of the rollout Deployment; None = the pod's own namespace."
    )
    deployment: str = Field("asyncopd-rollout", min_length=1, description="Name of the rollout Deployment.")
    interval_s: float = Field(15.0, gt=0, description="Seconds between two observations of the pipeline.")
    min_replicas: int = Field(1, ge=0, le=1024, description="Never scale the rollout Deployment below this.")
    max_replicas: int = Field(8, ge=1, le=1024, description="Never scale the rollout Deployment above this.")
    scale_up_threshold: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Scale up when the learner waited for data this fraction of the window (or more).",
    )
    scale_down_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Scale down when admission blocked rollouts this fraction of the window (or more).",
    )
    sustain: int = Field(
        3, ge=1, le=100, description="Hysteresis: consecutive observations a signal must hold before acting."
    )
    cooldown_up_s: float = Field(60.0, ge=0, description="Seconds after any change before the next scale-up.")
    cooldown_down_s: float = Field(300.0, ge=0, description="Seconds after any change before the next scale-down.")
    step_up: int = Field(1, ge=1, le=64, description="Replicas added by one scale-up.")
    step_down: int = Field(1, ge=1, le=64, description="Replicas removed by one scale-down.")
    dry_run: bool = Field(False, description="Log decisions without patching the Deployment.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalerConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaler.min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self
