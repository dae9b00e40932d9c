"""`asyncopd serve learner`: build the learner from a RunConfig and run it until SIGTERM/SIGINT.

Builds: the student (from the newest checkpoint when `learner.resume`), the trainer with the
configured estimator, the weight transport `weightsync.transport` names, the
LearnerService gRPC server, the metrics endpoint, the cache client, and the loop. SIGTERM
stops the loop after the current step and writes a checkpoint; after the configured number
of steps the process keeps serving Status (finished=true) until it is told to stop.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asyncopd.config.run import RunConfig
from asyncopd.learner import checkpoint
from asyncopd.learner.loop import LearnerLoop, LoopSettings, checkpointer
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, add_to_server
from asyncopd.learner.trainer import trainer_from_config
from asyncopd.models.loading import load_model, load_tokenizer
from asyncopd.observability import metrics
from asyncopd.opd import estimator_spec
from asyncopd.tracking import open_tracker
from asyncopd.weightsync.transport import WeightTransport, transport_from_config
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import RunningServer, channel, start_server

log = logging.getLogger(__name__)


@dataclass
class RunningLearner:
    """A built learner: run `loop.run()` (blocking), then `close()`."""

    loop: LearnerLoop
    server: RunningServer
    weights: WeightTransport
    metrics_server: metrics.MetricsServer | None

    def close(self) -> None:
        self.weights.close()
        self.server.stop(2.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()


def _advertised(config: RunConfig) -> str:
    if config.weightsync.advertise_host:
        return config.weightsync.advertise_host
    host = config.learner.server.host
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def build(config: RunConfig, name: str, stop: threading.Event, *, serve_metrics: bool = True) -> RunningLearner:
    lc = config.learner
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    resume_from = checkpoint.latest(lc.checkpoint_dir) if lc.resume else None
    tokenizer = load_tokenizer(config.models.student)
    model = load_model(str(resume_from or config.models.student), config.models.dtype, lc.device)
    teacher = None
    if estimator_spec(config.loss.kind).needs_teacher_logits:
        teacher = load_model(config.models.teacher, config.models.dtype, lc.device)
    trainer = trainer_from_config(config, model, pad_id=int(tokenizer.pad_token_id or 0), teacher=teacher)
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        trainer.load_state_dict(state["trainer"])
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at version %d", resume_from, trainer.version)

    weights = transport_from_config(
        config.weightsync,
        device=lc.device,
        bind_host=lc.server.host,
        advertise_host=_advertised(config),
        tls=config.tls,
        max_message_mb=lc.server.max_message_mb,
    )
    registry = metrics.ServiceRegistry("learner", name)
    recorder = metrics.LearnerMetrics(registry, estimator=config.loss.kind)
    metrics_server = metrics.MetricsServer(registry, lc.server.metrics_port, lc.server.host) if serve_metrics else None
    cache = CacheClient.for_run(channel(config.endpoints.cache, lc.server.max_message_mb, config.tls), config)
    evaluate = None
    if lc.eval_every:
        from asyncopd.evaluation.greedy import evaluate as run_eval
        from asyncopd.models.chat import prompt_formatter
        from asyncopd.tasks import load_task

        chat = prompt_formatter(config.models.student, config.task)
        items = list(load_task(config.task, "test", chat))[: lc.eval_size]
        max_tokens = config.rollout.sampling.max_tokens

        def evaluate() -> dict[str, float]:
            return {k: float(v) for k, v in run_eval(model, tokenizer, items, max_tokens).summary().items()}

    step_log = Path(lc.step_log or Path(config.output_dir) / "learner_steps.jsonl")
    loop = LearnerLoop(
        trainer,
        cache,
        weights,
        LoopSettings(
            steps=lc.steps,
            batch_size=lc.batch_size,
            pull_wait_ms=lc.pull_wait_ms,
            checkpoint_every=lc.checkpoint_every,
            eval_every=lc.eval_every,
            name=name,
            log_sample_ids=lc.log_sample_ids,
        ),
        stop=stop,
        step_log=step_log,
        metrics=recorder,
        save_checkpoint=checkpointer(trainer, lc.checkpoint_dir, tokenizer=tokenizer, keep=lc.keep_checkpoints),
        evaluate=evaluate,
        resumed_from=trainer.version if resume_from is not None else None,
        tracker=open_tracker(config.tracking, config.output_dir, config.name),
    )
    servicer = LearnerServicer(weights, loop.progress)
    server = start_server(lc.server, [add_to_server(servicer)], [SERVICE_NAME], config.tls)
    return RunningLearner(loop, server, weights, metrics_server)


def serve(config: RunConfig, name: str) -> None:
    """Run the learner until SIGTERM/SIGINT (checkpointing on the way out)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    learner = build(config, name, stop)
    log.info("learner %s serving on port %d at version %d", name, learner.server.port, learner.loop.trainer.version)
    try:
        learner.loop.run()
        while not stop.wait(0.5):  # finished: keep answering Status until told to stop
            pass
    finally:
        learner.close()
        log.info("learner %s stopped at version %d", name, learner.loop.trainer.version)
