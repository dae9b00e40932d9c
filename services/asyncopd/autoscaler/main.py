"""`asyncopd serve autoscaler`: scale the rollout Deployment from pipeline signals until SIGTERM.

Builds the parts from the run config (the cache and learner clients, the in-cluster API
client, the policy) and ticks the controller every `autoscaler.interval_s`. It also serves
gRPC health (for the pod's probes) and its Prometheus metrics.
"""

from __future__ import annotations

import logging
import signal
import threading

import grpc
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from asyncopd.autoscaler.controller import Controller
from asyncopd.autoscaler.kube import DeploymentScale, in_cluster_api, own_namespace
from asyncopd.autoscaler.policy import Decision, PolicyParams, ScalingPolicy
from asyncopd.autoscaler.signals import SignalWindow
from asyncopd.config import RunConfig
from asyncopd.config.autoscaler import AutoscalerConfig
from asyncopd.observability import metrics
from asyncopd.wire import rpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.learner_client import LearnerClient

log = logging.getLogger(__name__)

HEALTH_SERVICE = "asyncopd.v1.Autoscaler"


def policy_params(cfg: AutoscalerConfig) -> PolicyParams:
    return PolicyParams(
        min_replicas=cfg.min_replicas,
        max_replicas=cfg.max_replicas,
        scale_up_threshold=cfg.scale_up_threshold,
        scale_down_threshold=cfg.scale_down_threshold,
        sustain=cfg.sustain,
        cooldown_up_s=cfg.cooldown_up_s,
        cooldown_down_s=cfg.cooldown_down_s,
        step_up=cfg.step_up,
        step_down=cfg.step_down,
    )


class MetricsSink:
    """Records each decision in the autoscaler's Prometheus metrics."""

    def __init__(self, m: metrics.AutoscalerMetrics) -> None:
        self._m = m

    def record(self, decision: Decision) -> None:
        self._m.desired_replicas.set(decision.replicas)
        self._m.decisions.labels(reason=decision.kind).inc()


def serve(config: RunConfig, name: str) -> None:
    """Run until SIGTERM/SIGINT, scaling through the pod's in-cluster API credentials."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # The Kubernetes side first: outside a pod this fails before anything is started.
    run(config, name, in_cluster_api(), stop)


def run(
    config: RunConfig,
    name: str,
    api: ApiClient,
    stop: threading.Event,
    registry: metrics.ServiceRegistry | None = None,
) -> None:
    """Tick the controller every `autoscaler.interval_s` until `stop` is set; serve health and metrics."""
    cfg = config.autoscaler
    scale = DeploymentScale(api, cfg.namespace or own_namespace(), cfg.deployment)
    registry = registry or metrics.ServiceRegistry(service="autoscaler", replica=name)
    metrics_server = metrics.MetricsServer(registry, cfg.server.metrics_port, cfg.server.host)
    health = rpc.start_server(cfg.server, [], [HEALTH_SERVICE], config.tls)
    cache_channel = rpc.channel(config.endpoints.cache, cfg.server.max_message_mb, config.tls)
    learner_channel = rpc.channel(config.endpoints.learner, cfg.server.max_message_mb, config.tls)
    cache = CacheClient(cache_channel)
    learner = LearnerClient(learner_channel)
    controller = Controller(
        ScalingPolicy(policy_params(cfg)),
        SignalWindow(batch_size=config.learner.batch_size, window=cfg.sustain + 1),
        scale,
        read_stats=cache.stats,
        read_status=learner.status,
        sink=MetricsSink(metrics.AutoscalerMetrics(registry)),
        dry_run=cfg.dry_run,
    )
    log.info(
        "autoscaler %s: scaling %s/%s in [%d, %d]",
        name,
        scale.namespace,
        scale.name,
        cfg.min_replicas,
        cfg.max_replicas,
    )
    try:
        while not stop.is_set():
            try:
                controller.tick()
            except grpc.RpcError as err:
                # The cache or learner is restarting: skip this tick, the next one retries.
                log.warning("pipeline unreachable, no decision this tick: %s", err)
            except ApiException as err:
                # 403 means the Role does not match the Deployment name: say so every tick.
                log.error(
                    "Kubernetes API refused %s/%s scale: %s %s", scale.namespace, scale.name, err.status, err.reason
                )
            stop.wait(cfg.interval_s)
    finally:
        health.stop()
        cache_channel.close()
        learner_channel.close()
        metrics_server.stop()
