"""`asyncopd serve cache`: build the cache service from a run config and serve it.

`start_cache` builds everything (Redis client, prompt catalog, store, servicer, gRPC and
metrics servers) and returns a handle, so tests and the local launcher can run it in-process;
`serve` blocks on it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from asyncopd.cache.connection import check_eviction_policy, connect
from asyncopd.cache.prompts import PromptCatalog, Tokenize
from asyncopd.cache.recorder import MetricsRecorder
from asyncopd.cache.requests import ServicerLimits
from asyncopd.cache.servicer import CacheServicer
from asyncopd.cache.shards import ShardedStore
from asyncopd.cache.store import ExperienceStore, StorePolicy
from asyncopd.cache.waits import waiting_limit
from asyncopd.config import RunConfig
from asyncopd.models.chat import prompt_formatter
from asyncopd.models.files import hub_offline, light_tokenizer, resolve_model_path
from asyncopd.observability import metrics
from asyncopd.tasks import PromptItem, load_task
from asyncopd.v1 import cache_pb2_grpc
from asyncopd.wire.rpc import RunningServer, start_server

log = logging.getLogger(__name__)
SERVICE_NAME = "asyncopd.v1.CacheService"
_MIB = 1 << 20


def store_policy(config: RunConfig) -> StorePolicy:
    c = config.cache
    return StorePolicy(
        max_staleness=config.max_staleness,
        batch_size=config.learner.batch_size,
        byte_budget=int(c.byte_budget_mb * _MIB),
        eviction=c.eviction,
        order=c.order,
        teacher_lease_s=c.teacher_lease_s,
        prompt_lease_s=c.prompt_lease_s,
        batch_claim_s=c.batch_claim_s,
        retry_s=c.redis_retry_s,
        poll_s=c.poll_interval_ms / 1000.0,
        payload_ttl_s=c.payload_ttl_s,
        max_deliveries=c.max_deliveries,
        stale_tokens=config.stale_tokens,
        max_tokens_in_flight=c.max_tokens_in_flight,
        tokens_per_ticket=config.rollout.sampling.max_tokens,
        hold_until_learner=c.hold_until_learner,
    )


def student_tokenizer(config: RunConfig) -> tuple[Tokenize, int]:
    """The student's tokenizer and vocabulary size (the larger of tokenizer and embedding).

    Read with the `tokenizers` library alone where that is exact (a local model directory with
    a plain fast tokenizer): a restarted cache then does ~1 s of start-up work, not ~5 s, most
    of which was importing transformers and torch."""
    light = light_tokenizer(config.models.student)
    if light is not None:
        return light
    from transformers import AutoConfig

    from asyncopd.models.loading import load_tokenizer

    tokenizer = load_tokenizer(config.models.student)
    model_cfg = AutoConfig.from_pretrained(resolve_model_path(config.models.student), local_files_only=hub_offline())
    vocab = max(len(tokenizer), int(getattr(model_cfg, "vocab_size", 0) or 0))

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tokenize, vocab


@dataclass
class RunningCache:
    """A started cache service; `stop()` shuts it down (Redis keeps the state)."""

    server: RunningServer
    store: ExperienceStore | ShardedStore
    servicer: CacheServicer
    metrics_server: metrics.MetricsServer | None

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.store.close()


def start_cache(
    config: RunConfig,
    name: str = "cache",
    *,
    prompts: Sequence[PromptItem] | None = None,
    tokenize: Tokenize | None = None,
    vocab_size: int | None = None,
    client: redis.Redis | None = None,
    serve_metrics: bool = True,
) -> RunningCache:
    """Build and start the cache service. `prompts`/`tokenize`/`vocab_size` default to the
    configured task and the student's tokenizer; `client` to a connection from `config.redis`."""
    c = config.cache
    if tokenize is None or vocab_size is None:
        tokenize, vocab_size = student_tokenizer(config)
    if prompts is None:  # the configured task, in the student's chat template when task.chat_template
        prompts = list(load_task(config.task, "train", prompt_formatter(config.models.student, config.task)))
    items = list(prompts)
    catalog = PromptCatalog(items, tokenize, vocab_size, seed=config.task.seed)
    # every gRPC worker may run a script at once, plus the wake-up listener and the gauge refresher
    redis_client = client or connect(
        config.redis, socket_timeout_s=c.max_wait_ms / 1000.0 + 10.0, max_connections=c.server.workers + 8
    )
    registry = metrics.ServiceRegistry("cache", name)
    policy = store_policy(config)
    recorder = MetricsRecorder(metrics.CacheMetrics(registry, eviction_policy=c.eviction), policy)
    store: ExperienceStore | ShardedStore
    if c.shards > 1:
        store = ShardedStore(redis_client, config.redis.key_prefix, policy, c.shards, recorder.redis_error)
    else:  # on a Redis Cluster the one keyspace is hash-tagged too (shard 0), so scripts run on one node
        shard = 0 if config.redis.cluster else None
        store = ExperienceStore(redis_client, config.redis.key_prefix, policy, recorder.redis_error, shard=shard)
    check_eviction_policy(redis_client)  # once reachable: an evicting Redis would lose samples silently
    limits = ServicerLimits(
        vocab_size=vocab_size,
        logprob_dtype=c.logprob_dtype,
        max_request_bytes=int(c.max_request_mb * _MIB),
        max_items=c.max_items_per_request,
        max_wait_ms=c.max_wait_ms,
        max_waiting=waiting_limit(c.server.workers),
        key_prefix=config.redis.key_prefix,
        tagged=c.shards > 1 or config.redis.cluster,
    )
    servicer = CacheServicer(store, catalog, limits, recorder)
    server = start_server(
        c.server,
        [lambda s: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        config.tls,
    )
    metrics_server = metrics.MetricsServer(registry, c.server.metrics_port, c.server.host) if serve_metrics else None
    return RunningCache(server, store, servicer, metrics_server)


def _refresh_gauges(cache: RunningCache, stop: threading.Event, every_s: float = 5.0) -> None:
    """Copy Redis-held gauges (in flight, bytes, queue depths) into this process's metrics."""
    while not stop.wait(every_s):
        try:
            s = cache.store.stats()
        except Exception as exc:  # a scrape gap is not worth dying for; the RPCs report outages
            log.warning("could not refresh cache gauges: %s", exc)
            continue
        cache.servicer.recorder.refresh(s)


def serve(config: RunConfig, name: str) -> None:
    """Run the cache service until SIGTERM/SIGINT."""
    cache = start_cache(config, name)
    log.info("cache %s serving on %s (key prefix %s)", name, cache.address, config.redis.key_prefix)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    refresher = threading.Thread(target=_refresh_gauges, args=(cache, stop), daemon=True)
    refresher.start()
    stop.wait()
    log.info("cache %s stopping", name)
    cache.stop()
