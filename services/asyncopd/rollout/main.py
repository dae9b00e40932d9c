"""`asyncopd serve rollout`: build the engine, serve gRPC, run the cache loop and weight sync.

What the replica records follows the estimator's declared support (`asyncopd.opd.estimator_spec`):
the student's top-K (K = loss.k, reverse_kl_topk), N = loss.k MC draws per position
(reverse_kl_mc), or nothing for estimators whose ids the teacher supplies or that need none.
The process blocks until SIGTERM/SIGINT, then stops the loop (tickets of unfinished work go
back to the cache), the weight-sync subscriber, the gRPC server and the metrics endpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from asyncopd.config import RunConfig
from asyncopd.config.loss import LossConfig
from asyncopd.models.files import resolve_model_path
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.observability import metrics
from asyncopd.opd import Support, estimator_spec
from asyncopd.records import SupportKind
from asyncopd.rollout.engine import Engine
from asyncopd.rollout.replica import RolloutLoop, RolloutReplica
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.servicer import SERVICE_NAME, RolloutServicer
from asyncopd.v1 import rollout_pb2_grpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel, start_server

log = logging.getLogger(__name__)


# what a rollout records for an estimator whose ids it supplies (K = N = loss.k)
_RECORDS = {Support.STUDENT_TOPK: SupportKind.STUDENT_TOPK, Support.MC_SAMPLES: SupportKind.MC_SAMPLES}


def support_for(loss: LossConfig) -> tuple[SupportKind, int]:
    """What per-position support the configured estimator needs from rollouts."""
    support = estimator_spec(loss.kind).support
    if support in _RECORDS:
        return _RECORDS[support], loss.k
    return SupportKind.NONE, 0


def sampling_from_config(config: RunConfig) -> Sampling:
    s = config.rollout.sampling
    return Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, stop=tuple(s.stop))


def build_engine(config: RunConfig, name: str) -> Engine:
    rc = config.rollout
    if rc.engine == "transformers":
        from asyncopd.rollout.transformers_engine import TransformersEngine

        if rc.pause_mode != "keep":
            raise ValueError("rollout.pause_mode: 'abort' needs rollout.engine vllm (transformers keeps decoding)")
        model = load_model(config.models.student, config.models.dtype, rc.device)
        return TransformersEngine(model, load_tokenizer(config.models.student), name, max_model_len=rc.max_model_len)
    if rc.engine == "vllm":
        from asyncopd.rollout.vllm_engine import VLLMEngine

        v = rc.vllm
        return VLLMEngine(
            resolve_model_path(config.models.student),
            name,
            dtype=v.dtype or config.models.dtype,
            max_model_len=v.max_model_len or rc.max_model_len,
            seed=config.seed,
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager,
            enable_prefix_caching=v.enable_prefix_caching,
            pause_mode=rc.pause_mode,
        )
    raise ValueError(f"rollout.engine: {rc.engine!r} cannot serve; allowed here: 'transformers', 'vllm'")


def _thread(
    name: str, target: Callable[[], None], errors: list[BaseException], stop: threading.Event
) -> threading.Thread:
    def body() -> None:
        try:
            target()
        except BaseException as exc:
            log.exception("%s failed", name)
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread


def serve(config: RunConfig, name: str) -> None:
    registry = metrics.ServiceRegistry("rollout", name)
    # vLLM records its engine metrics in prometheus_client's default registry: serve them here too.
    registry.register(metrics.ReexportedFamilies(metrics.VLLM_PREFIX))
    m = metrics.RolloutMetrics(registry)
    metrics_server = metrics.MetricsServer(registry, config.rollout.server.metrics_port, config.rollout.server.host)
    engine = build_engine(config, name)
    replica = RolloutReplica(engine, name, m)
    sampling = sampling_from_config(config)
    cache_channel = channel(config.endpoints.cache, config.rollout.server.max_message_mb, config.tls)
    cache = CacheClient.for_run(cache_channel, config)
    # PushWeights accepts up to the cache's published version + 1, so a replica that fell behind
    # (or joined late) can take the learner's current weights; see RolloutServicer.
    servicer = RolloutServicer(replica, sampling, published=cache.published_version)
    server = start_server(
        config.rollout.server,
        [lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        config.tls,
    )
    log.info("rollout replica %s (%s engine) on port %d", name, engine.info.name, server.port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    errors: list[BaseException] = []
    kind, k = support_for(config.loss)
    loop = RolloutLoop(
        replica,
        cache,
        sampling=sampling,
        support_kind=kind,
        k=k,
        batch_size=config.rollout.batch_size,
        wait_ms=config.rollout.acquire_wait_ms,
        metrics=m,
        continuous=config.rollout.continuous,
        max_lag=config.max_staleness,
    )
    threads = [_thread("rollout-loop", lambda: loop.run(stop), errors, stop)]

    from asyncopd.weightsync.manifest import param_specs
    from asyncopd.weightsync.subscriber import run_subscriber

    threads.append(
        _thread(
            "weight-sync",
            lambda: run_subscriber(
                config.endpoints.learner,
                name,
                replica.load_weights,
                stop,
                config.weightsync,
                config.tls,
                # announced buckets are checked against this model before anything is allocated
                expected=param_specs(engine.param_shapes()),
            ),
            errors,
            stop,
        )
    )
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        stop.set()
        cache.stop_waiting()  # a loop waiting at the cache (up to acquire_wait_ms) returns now
        for thread in threads:
            thread.join(timeout=30)
        server.stop()
        cache_channel.close()
        metrics_server.stop()
        engine.close()
    if errors:
        raise errors[0]
