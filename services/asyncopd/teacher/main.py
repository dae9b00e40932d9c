"""`asyncopd serve teacher`: load the teacher, check it shares the student's tokenizer, serve
gRPC and run the cache loop until SIGTERM/SIGINT.

The teacher top-K it returns is loss.k when the estimator's ids are the teacher's top-K
(forward_kl_topk: the learner needs exactly K), teacher.topk otherwise. Startup refuses
(TokenizerMismatchError) when the teacher's tokenizer maps tokens to ids differently from the
student's: the teacher scores the student's token ids, so a mismatch would silently score the
wrong tokens.

`teacher.backend` picks the scorer: torch (`teacher.scorer`, transformers on teacher.device) or
vllm (`teacher.vllm_scorer`, an in-process vLLM engine with `teacher.vllm`'s settings; the same
answers, reduced inside the engine).
"""

from __future__ import annotations

import logging
import signal
import threading

from asyncopd.config import RunConfig
from asyncopd.models.files import resolve_model_path
from asyncopd.models.loading import check_same_tokenizer, load_model, load_tokenizer
from asyncopd.observability import metrics
from asyncopd.opd import Support, estimator_spec
from asyncopd.teacher.replica import TeacherLoop, TeacherReplica
from asyncopd.teacher.scorer import Scorer, TeacherScorer
from asyncopd.teacher.servicer import SERVICE_NAME, TeacherServicer
from asyncopd.v1 import teacher_pb2_grpc
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel, start_server

log = logging.getLogger(__name__)


def teacher_topk(config: RunConfig) -> int:
    return config.loss.k if estimator_spec(config.loss.kind).support is Support.TEACHER_TOPK else config.teacher.topk


def build_scorer(config: RunConfig, name: str) -> Scorer:
    """The configured backend's scorer, after checking teacher and student share one tokenizer."""
    tc = config.teacher
    tokenizer = load_tokenizer(config.models.teacher)
    check_same_tokenizer(load_tokenizer(config.models.student), tokenizer)
    if tc.backend == "vllm":
        from asyncopd.teacher.vllm_scorer import VLLMTeacherScorer

        v = tc.vllm
        return VLLMTeacherScorer(
            resolve_model_path(config.models.teacher),
            name,
            dtype=v.dtype or config.models.dtype,
            max_model_len=v.max_model_len,
            max_batch_tokens=tc.max_batch_tokens,
            seed=config.seed,
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager,
            enable_prefix_caching=v.enable_prefix_caching,
        )
    if tc.backend != "torch":
        raise ValueError(f"teacher.backend: {tc.backend!r} cannot serve; allowed here: 'torch', 'vllm'")
    model = load_model(config.models.teacher, config.models.dtype, tc.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TeacherScorer(model, name, tc.max_batch_tokens, pad_id=int(pad))


def serve(config: RunConfig, name: str) -> None:
    scorer = build_scorer(config, name)
    registry = metrics.ServiceRegistry("teacher", name)
    m = metrics.TeacherMetrics(registry)
    metrics_server = metrics.MetricsServer(registry, config.teacher.server.metrics_port, config.teacher.server.host)
    replica = TeacherReplica(scorer, name, m)
    servicer = TeacherServicer(replica)
    server = start_server(
        config.teacher.server,
        [lambda s: teacher_pb2_grpc.add_TeacherServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        config.tls,
    )
    log.info("teacher replica %s on port %d", name, server.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    errors: list[BaseException] = []
    topk = teacher_topk(config)
    cache_channel = channel(config.endpoints.cache, config.teacher.server.max_message_mb, config.tls)
    cache = CacheClient.for_run(cache_channel, config)
    loop = TeacherLoop(
        replica,
        cache,
        topk=topk,
        tail=config.teacher.tail and topk > 0,
        claim_batch=config.teacher.claim_batch,
        wait_ms=config.teacher.claim_wait_ms,
        metrics=m,
    )

    def body() -> None:
        try:
            loop.run(stop)
        except BaseException as exc:
            log.exception("teacher loop failed")
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=body, name="teacher-loop", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        stop.set()
        cache.stop_waiting()  # a claim waiting at the cache (up to claim_wait_ms) returns now
        thread.join(timeout=30)
        server.stop()
        cache_channel.close()
        metrics_server.stop()
    if errors:
        raise errors[0]
