"""`asyncopd serve learner`: build the learner from a RunConfig and run it until SIGTERM/SIGINT.

Builds: the student (from the newest checkpoint when `learner.resume`), the trainer with the
configured estimator, the weight transport `weightsync.transport` names, the
LearnerService gRPC server, the metrics endpoint, the cache client, and the loop. With
`learner.world_size` > 1 this process is rank 0 of an FSDP2 learner (`asyncopd.learner.distributed`):
it starts ranks 1.. itself unless the environment names a rendezvous (RANK etc., a StatefulSet),
where a pod of rank > 0 runs `follower` instead of the service. SIGTERM
stops the loop after the current step and writes a checkpoint; after the configured number
of steps the process keeps serving Status (finished=true) until it is told to stop.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from asyncopd.config.run import RunConfig
from asyncopd.learner import checkpoint, distributed
from asyncopd.learner.loop import LearnerLoop, LoopSettings, checkpointer
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, add_to_server
from asyncopd.learner.trainer import Trainer, trainer_from_config
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
    lockstep: distributed.Lockstep | None = None
    followers: list[Any] = field(default_factory=list)  # ranks this process started

    def close(self) -> None:
        self.weights.close()
        self.server.stop(2.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.lockstep is not None:
            try:
                self.lockstep.lead(distributed.Op.STOP)
            except (RuntimeError, torch.distributed.DistError) as exc:
                # a rank died (that is why we stop): the others fail on their own collectives
                log.error("could not tell the other learner ranks to stop: %s", exc)
            for proc in self.followers:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
            torch.distributed.destroy_process_group()


def _advertised(config: RunConfig) -> str:
    if config.weightsync.advertise_host:
        return config.weightsync.advertise_host
    host = config.learner.server.host
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def build_trainer(
    config: RunConfig, lockstep: distributed.Lockstep | None = None
) -> tuple[Trainer, PreTrainedTokenizerBase, Path | None]:
    """The trainer (restored from the newest checkpoint when `learner.resume`), its tokenizer and
    that checkpoint. Every rank of a sharded learner builds its own, the same way."""
    lc = config.learner
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    resume_from = checkpoint.latest(lc.checkpoint_dir) if lc.resume else None
    sharded_checkpoint = resume_from is not None and checkpoint.is_sharded(resume_from)
    tokenizer = load_tokenizer(config.models.student)
    # the optimizer steps these weights: load them in the training dtype (the rollout's is models.dtype)
    weights = config.models.student if resume_from is None or sharded_checkpoint else str(resume_from)
    model = load_model(str(weights), lc.param_dtype, lc.device)
    teacher = None
    if estimator_spec(config.loss.kind).needs_teacher_logits:
        teacher = load_model(config.models.teacher, config.models.dtype, lc.device)
    trainer = trainer_from_config(
        config, model, pad_id=int(tokenizer.pad_token_id or 0), teacher=teacher, lockstep=lockstep
    )
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if sharded_checkpoint:
            checkpoint.load_sharded(resume_from, trainer.model, trainer.optimizer)
        elif lockstep is not None:  # a one-process checkpoint into a sharded learner
            checkpoint.load_optimizer_by_position(trainer.model, trainer.optimizer, state["trainer"].pop("optimizer"))
        trainer.load_state_dict(state["trainer"])
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at version %d", resume_from, trainer.version)
    return trainer, tokenizer, resume_from


def sharded_checkpointer(trainer: Trainer, config: RunConfig, tokenizer: Any = None) -> Callable[[], Path]:
    """Every rank's checkpoint call (rank 0's also tells the others to make theirs)."""
    lc = config.learner
    lockstep = trainer.lockstep
    assert lockstep is not None

    def save() -> Path:
        lockstep.lead(distributed.Op.SAVE)
        state = {k: v for k, v in trainer.state_dict().items() if k != "optimizer"}
        path = checkpoint.save_sharded(
            lc.checkpoint_dir,
            trainer.model,  # type: ignore[arg-type]
            trainer.optimizer,
            state,
            rank=lockstep.rank,
            world_size=lockstep.world_size,
            tokenizer=tokenizer,
            keep=lc.keep_checkpoints,
        )
        if lockstep.leader:
            log.info("checkpoint %s (version %d, %d ranks)", path, trainer.version, lockstep.world_size)
        return path

    return save


def follower(rank: int, port: int, config: RunConfig, master_addr: str = "127.0.0.1") -> None:
    """Rank > 0 of a sharded learner: build the same trainer, then train, gather and checkpoint
    when rank 0 says so, until it says stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    lc = config.learner
    device = distributed.init(distributed.Rendezvous(rank, lc.world_size, master_addr, port), lc.device)
    config = config.model_copy(update={"learner": lc.model_copy(update={"device": device})})
    lockstep = distributed.Lockstep(rank, lc.world_size)
    trainer, _tokenizer, _ = build_trainer(config, lockstep)
    save = sharded_checkpointer(trainer, config)
    try:
        distributed.follow(
            lockstep,
            {
                distributed.Op.TRAIN: trainer.train,
                distributed.Op.GATHER: lambda _: trainer.named_weights().gather_only(),
                distributed.Op.SAVE: lambda _: save(),
            },
        )
    finally:
        torch.distributed.destroy_process_group()


def _spawned_follower(rank: int, port: int, config: RunConfig, master_addr: str) -> None:
    follower(rank, port, config, master_addr)
    distributed.leave()


def _start_ranks(config: RunConfig) -> tuple[RunConfig, distributed.Lockstep | None, list[Any]]:
    """Rank 0's side of `learner.world_size` > 1: spawn the other ranks (local runs) and join them."""
    lc = config.learner
    if lc.world_size == 1:
        return config, None, []
    rv = distributed.Rendezvous.from_env(lc.world_size)
    procs: list[Any] = []
    if rv is None:
        rv = distributed.Rendezvous(0, lc.world_size, "127.0.0.1", distributed.free_port())
        procs = distributed.spawn_followers(_spawned_follower, (config, rv.master_addr), lc.world_size, rv.master_port)
    if rv.rank != 0:
        raise ValueError(f"the learner service is rank 0; rank {rv.rank} runs `follower`")
    device = distributed.init(rv, lc.device)
    config = config.model_copy(update={"learner": lc.model_copy(update={"device": device})})
    return config, distributed.Lockstep(0, lc.world_size), procs


def build(config: RunConfig, name: str, stop: threading.Event, *, serve_metrics: bool = True) -> RunningLearner:
    config, lockstep, followers = _start_ranks(config)
    lc = config.learner
    trainer, tokenizer, resume_from = build_trainer(config, lockstep)

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
    if lc.eval_every and lockstep is not None:
        # generation on rank 0 alone would enter FSDP collectives the other ranks never join
        log.warning("learner.eval_every is not run with learner.world_size > 1 (sharded weights); skipping")
    elif lc.eval_every:
        from asyncopd.evaluation.greedy import evaluate as run_eval
        from asyncopd.models.chat import prompt_formatter
        from asyncopd.tasks import load_task

        chat = prompt_formatter(config.models.student, config.task)
        model: Any = trainer.model
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
        save_checkpoint=sharded_checkpointer(trainer, config, tokenizer)
        if lockstep is not None
        else checkpointer(trainer, lc.checkpoint_dir, tokenizer=tokenizer, keep=lc.keep_checkpoints),
        evaluate=evaluate,
        resumed_from=trainer.version if resume_from is not None else None,
        tracker=open_tracker(config.tracking, config.output_dir, config.name),
    )
    servicer = LearnerServicer(weights, loop.progress)
    server = start_server(lc.server, [add_to_server(servicer)], [SERVICE_NAME], config.tls)
    return RunningLearner(loop, server, weights, metrics_server, lockstep, followers)


def serve(config: RunConfig, name: str) -> None:
    """Run the learner until SIGTERM/SIGINT (checkpointing on the way out)."""
    rv = distributed.Rendezvous.from_env(config.learner.world_size) if config.learner.world_size > 1 else None
    if rv is not None and rv.rank > 0:  # a StatefulSet pod of rank > 0
        # health only: the pod's probes see it alive while it follows rank 0
        health = start_server(config.learner.server, [], [], config.tls)
        try:
            follower(rv.rank, rv.master_port, config, rv.master_addr)
        finally:
            health.stop(2.0)
        distributed.leave()
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
