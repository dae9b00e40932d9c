"""The whole run's config: every section in one typed tree, the same locally and in Helm."""

from __future__ import annotations

from pydantic import Field

from asyncopd.config.autoscaler import AutoscalerConfig
from asyncopd.config.base import Section
from asyncopd.config.cache import CacheConfig
from asyncopd.config.endpoints import EndpointsConfig
from asyncopd.config.learner import LearnerConfig
from asyncopd.config.loss import LossConfig
from asyncopd.config.metrics import MetricsConfig
from asyncopd.config.model import ModelsConfig, TaskConfig
from asyncopd.config.redis import RedisConfig
from asyncopd.config.rollout import RolloutConfig
from asyncopd.config.security import TLSConfig
from asyncopd.config.teacher import TeacherConfig
from asyncopd.config.tracking import TrackingConfig
from asyncopd.config.weightsync import WeightSyncConfig


class RunConfig(Section):
    """A run: models, task, staleness bound, estimator, and each service's settings."""

    name: str = Field("toy", min_length=1, description="Run name (labels metrics, names outputs).")
    seed: int = Field(0, description="Global seed (sampling, shuffles, init).")
    max_staleness: int = Field(
        4,
        ge=0,
        description="Largest learner-version lag of a trained sample. 0 = strict synchronous training.",
    )
    output_dir: str = Field("runs/latest", description="Report, plots and checkpoints of a local run.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Student and teacher.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Prompts and grader.")
    loss: LossConfig = Field(default_factory=LossConfig, description="OPD estimator.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis behind the cache.")
    endpoints: EndpointsConfig = Field(default_factory=EndpointsConfig, description="Service addresses.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Cache service.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout replicas.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher replicas.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner.")
    weightsync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, description="Weight broadcast.")
    tls: TLSConfig = Field(default_factory=TLSConfig, description="gRPC TLS.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus export.")
    autoscaler: AutoscalerConfig = Field(
        default_factory=AutoscalerConfig, description="Rollout autoscaler (Kubernetes)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking fed from the learner's step records."
    )
