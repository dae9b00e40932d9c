"""The whole run's config: every section in one typed tree, the same locally and in Helm."""

from __future__ import annotations

from typing import Literal

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
    stale_tokens: Literal["drop", "mask"] = Field(
        "drop",
        description="What happens to a sample whose oldest token is more than max_staleness versions behind the "
        "learner (a long response that crossed weight versions): drop it whole, or mask those tokens (the learner "
        "trains on the rest; kept while its newest token is within the bound, counted in the cache's "
        "masked_samples and the learner's masked_stale_tokens).",
    )
    output_dir: str = Field(
        "runs/{name}/{timestamp}",
        description=(
            "Report, plots, logs and checkpoints of a local run. {name} and {timestamp} are filled in at start: "
            "each run its own directory, a 'latest' link beside them; a fixed directory holding an earlier run "
            "has it moved aside, never deleted."
        ),
    )
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


# Estimator kinds by what they consume, as asyncopd.opd.specs declares them (config stays free
# of torch, so it names them here; tests/unit/test_config_ux.py checks the two agree).
ROLLOUT_SUPPORT_KINDS = frozenset({"reverse_kl_topk", "reverse_kl_mc"})
"""The rollout records N MC draws or the student's top-K per position (N = K = loss.k)."""
DENSE_TEACHER_KINDS = frozenset({"forward_kl_full", "reverse_kl_full"})
"""Dense teacher logits at the learner, from a teacher model the learner runs itself."""
DENSE_LOGIT_TEACHER_BACKENDS = frozenset({"torch"})
"""Teacher backends that can produce dense [T, V] logits (a full forward pass in torch)."""
# Bytes one rollout carries per position and support column: an int32 id and a float32 log μ.
_SUPPORT_BYTES = 8
_FILE_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


def cross_field_errors(config: RunConfig) -> list[tuple[str, str]]:
    """(field path, problem) for every rule that spans fields or sections — checked when a config
    is loaded, so `asyncopd config check` reports what would otherwise fail at run time."""
    errors: list[tuple[str, str]] = []
    task = config.task
    source = task.data_source
    if task.name in ("toy", "wide"):
        if source is not None:
            errors.append(
                ("task.source", f"set to {source!r} but task.name is {task.name!r} (set task.name: jsonl|parquet|hf)")
            )
    elif source is None:
        errors.append(
            ("task.source", f"required when task.name is {task.name!r} (the dataset file or name; or task.path)")
        )
    elif task.name in _FILE_SUFFIXES and not source.endswith(_FILE_SUFFIXES[task.name]):
        allowed = "/".join(_FILE_SUFFIXES[task.name])
        errors.append(("task.name", f"{task.name!r} reads {allowed} files, but task.source is {source!r}"))
    if not task.chat_template:
        for field in ("enable_thinking", "system_prompt"):
            if getattr(task, field) is not None:
                errors.append((f"task.{field}", "only applies with task.chat_template: true"))

    kind = config.loss.kind
    if kind in DENSE_TEACHER_KINDS and config.teacher.backend not in DENSE_LOGIT_TEACHER_BACKENDS:
        errors.append(
            (
                "loss.kind",
                f"{kind!r} needs dense teacher logits, which teacher.backend {config.teacher.backend!r} cannot "
                f"give (only {sorted(DENSE_LOGIT_TEACHER_BACKENDS)}); use forward_kl_topk or reverse_kl_mc",
            )
        )
    if kind in ROLLOUT_SUPPORT_KINDS:
        # One PutRollouts request carries a replica's whole batch, each rollout with loss.k
        # support columns at every generated position; the cache refuses larger requests.
        per_rollout = config.rollout.sampling.max_tokens * config.loss.k * _SUPPORT_BYTES
        request = per_rollout * config.rollout.batch_size
        limit = config.cache.max_request_mb * (1 << 20)
        if request > limit:
            most = int(limit // (config.rollout.sampling.max_tokens * _SUPPORT_BYTES * config.rollout.batch_size))
            what = "MC draws" if kind == "reverse_kl_mc" else "top-K ids"
            errors.append(
                (
                    "loss.k",
                    f"{config.loss.k} {what} per position × rollout.sampling.max_tokens "
                    f"{config.rollout.sampling.max_tokens} × rollout.batch_size {config.rollout.batch_size} × "
                    f"{_SUPPORT_BYTES} B = {request / (1 << 20):.1f} MiB per rollout request, more than "
                    f"cache.max_request_mb {config.cache.max_request_mb}; at most {most} fits "
                    "(or lower rollout.batch_size / raise cache.max_request_mb)",
                )
            )
    tokens = config.cache.max_tokens_in_flight
    per_ticket = config.rollout.sampling.max_tokens
    if tokens and tokens < per_ticket * config.cache.shards:
        errors.append(
            (
                "cache.max_tokens_in_flight",
                f"{tokens} admits nothing: every admission ticket reserves rollout.sampling.max_tokens "
                f"({per_ticket}) and each of the {config.cache.shards} cache.shards keeps its share of the budget; "
                f"set it to at least {per_ticket * config.cache.shards} (or 0 for no token budget)",
            )
        )
    return errors
