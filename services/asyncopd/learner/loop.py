"""The learner's training loop: pull a versioned batch -> train -> ack -> publish weights -> publish version.

Each iteration pulls up to `batch_size` scored samples no staler than the cache's bound,
runs the trainer's optimizer step(s) (version += steps), acks the batch, broadcasts the new
weights to the rollout replicas, and then tells the cache the new version (so admission
control and staleness accounting use it). Every step is recorded in the Prometheus metrics
and as one JSON line (the launcher builds the report and plots from that file); checkpoints
and evaluations happen every N versions, and a final checkpoint when the loop stops (SIGTERM
or the configured number of steps).

Faults it rides through: the cache (or its Redis) being unreachable for a while (every cache
call is retried with backoff until it answers or the loop is stopped); an ack the cache refuses
because it no longer knows the claim (Redis lost it, or it expired) — logged and counted, the
cache owns those samples' accounting; and a restart from a checkpoint older than the version
it had published before it died: it then continues numbering after the published version
(`catch_up`), so versions stay monotonic for the replicas, the cache and staleness accounting,
and it logs a `start` event naming the checkpoint it resumed from (steps logged after that
checkpoint by the previous incarnation were lost with it).

It knows the trainer, the cache client, a `WeightTransport` (not which backend moves the bytes)
and the checkpoint files; the gRPC server and process signals belong to `asyncopd.learner.main`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from asyncopd.learner import checkpoint
from asyncopd.learner.servicer import Progress
from asyncopd.learner.trainer import StepStats, Trainer
from asyncopd.observability.metrics import LearnerMetrics
from asyncopd.records import ScoredSample
from asyncopd.tracking import Tracker
from asyncopd.weightsync.transport import PublishReport, WeightTransport
from asyncopd.wire.rpc import Outage, retryable

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchSource(Protocol):
    """What the loop needs of the cache (asyncopd.wire.cache_client.CacheClient fits)."""

    def pull_batch(self, size: int, learner_version: int, wait_ms: int = 0, learner: str = "learner") -> Any: ...
    def ack_batch(self, batch_id: str) -> int: ...
    def publish_version(self, version: int, finished: bool = False) -> int: ...
    def published_version(self) -> int: ...


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs (mapped from LearnerConfig by main)."""

    steps: int
    batch_size: int
    pull_wait_ms: int = 1000
    checkpoint_every: int = 0
    eval_every: int = 0
    name: str = "learner"
    # Write each step's sample ids into the step log (chaos checks: no sample trained twice).
    log_sample_ids: bool = False
    # Longest back-off between retries of a cache call that found the cache unreachable.
    max_retry_delay_s: float = 0.5


Evaluate = Callable[[], dict[str, float]]
SaveCheckpoint = Callable[[], Path]


class LearnerLoop:
    """Drive the trainer from the cache and deliver every new version to replicas and cache."""

    def __init__(
        self,
        trainer: Trainer,
        source: BatchSource,
        weights: WeightTransport | None,
        settings: LoopSettings,
        *,
        stop: threading.Event,
        step_log: Path | None = None,
        metrics: LearnerMetrics | None = None,
        save_checkpoint: SaveCheckpoint | None = None,
        evaluate: Evaluate | None = None,
        resumed_from: int | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        """`weights`: where new versions go (None: nowhere but the cache); `resumed_from`: the version of
        the checkpoint the trainer was restored from, if any."""
        self.trainer = trainer
        self.source = source
        self.weights = weights
        self.settings = settings
        self.stop = stop
        self.step_log = step_log
        self.metrics = metrics
        self.save_checkpoint = save_checkpoint
        self.evaluate = evaluate
        self.tracker = tracker  # receives every step-log record (asyncopd.tracking)
        self._last_loss = 0.0
        self._tokens_per_second = 0.0
        self._steps_run = 0
        self.resumed_from = resumed_from
        self.acks_refused = 0
        self._delivered: int | None = None
        self._cache_outage = Outage("learner: the cache", first_delay_s=0.1, max_delay_s=settings.max_retry_delay_s)
        self.finished = trainer.version >= settings.steps
        if step_log is not None:
            step_log.parent.mkdir(parents=True, exist_ok=True)

    def progress(self) -> Progress | None:
        """Status: the last version this learner *delivered* (replicas and cache have it); None
        before its first delivery. A step in progress is not reported: if the process dies
        before delivering it, a restarted learner would report a lower version."""
        if self._delivered is None:
            return None
        return Progress(
            version=self._delivered,
            steps_total=self.settings.steps,
            last_loss=self._last_loss,
            train_tokens_per_second=self._tokens_per_second,
            finished=self.finished,
        )

    def run(self) -> None:
        """Train until `steps` versions or `stop`; always ends with a checkpoint and the version published."""
        self.catch_up()
        self.finished = self.trainer.version >= self.settings.steps
        self._deliver(self.trainer.version)  # replicas (and a restarted cache) start from our version
        if self.metrics is not None:
            self.metrics.target_steps.set(self.settings.steps)
            self.metrics.policy_version.set(self.trainer.version)
        last_checkpoint = self.trainer.version
        try:
            while not self.stop.is_set() and not self.finished:
                if not self._iteration():
                    continue
                version = self.trainer.version
                every = self.settings.checkpoint_every
                if self.save_checkpoint is not None and every and version // every > last_checkpoint // every:
                    self._checkpoint()
                    last_checkpoint = version
                if self.evaluate is not None and self.settings.eval_every and version % self.settings.eval_every == 0:
                    self._run_eval()
        finally:
            if self.save_checkpoint is not None and self.trainer.version != last_checkpoint:
                self._checkpoint()
            if self.tracker is not None:
                self.tracker.close()
        if self.finished:
            version = self.trainer.version
            self._cache_call("publish_version", lambda: self.source.publish_version(version, finished=True))
            log.info("training finished at version %d", self.trainer.version)

    def catch_up(self) -> None:
        """Start numbering after the version the cache has published (see the module doc); log a start event."""
        published = self._cache_call("published_version", self.source.published_version)
        start = self.trainer.version
        if published > start:
            log.warning(
                "the cache has version %d published but this learner starts at %d (resumed from an older "
                "checkpoint, or none): continuing at version %d; the %d steps in between were lost",
                published,
                start,
                published,
                published - start,
            )
            self.trainer.version = published
        self._write(
            {
                "event": "start",
                "version": self.trainer.version,
                "checkpoint_version": self.resumed_from,
                "published_version": published,
                "time_unix": time.time(),
            }
        )

    def _cache_call(self, what: str, op: Callable[[], T]) -> T:
        """`op()`, retried with backoff while the cache is unreachable, until it answers or `stop` is set."""
        while True:
            try:
                result = op()
            except grpc.RpcError as err:
                if not retryable(err) or self.stop.is_set():
                    raise
                self.stop.wait(self._cache_outage.failed(err, what))
                continue
            self._cache_outage.ok()
            return result

    @property
    def cache_retries(self) -> int:
        """Cache calls retried because the cache (or its Redis) was unreachable."""
        return self._cache_outage.failures

    def _checkpoint(self) -> None:
        """Write a checkpoint; its time and its failures go to the metrics (the checkpoint-age and
        checkpoint-failure alerts), a failure still propagates."""
        assert self.save_checkpoint is not None
        try:
            self.save_checkpoint()
        except Exception:
            if self.metrics is not None:
                self.metrics.checkpoint_failures.inc()
            raise
        if self.metrics is not None:
            self.metrics.checkpoint_unixtime.set(time.time())

    def _ack(self, batch_id: str) -> None:
        try:
            self._cache_call("ack_batch", lambda: self.source.ack_batch(batch_id))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                raise
            # The cache lost the claim (Redis restarted empty) or let it expire: it counts those
            # samples (lost, or back in the pool); this learner must not count them again.
            self.acks_refused += 1
            if self.metrics is not None:
                self.metrics.acks_refused.inc()
            log.warning("ack of batch %s refused: %s", batch_id, err.details())  # type: ignore[attr-defined]

    def _iteration(self) -> bool:
        start = time.perf_counter()
        version = self.trainer.version
        batch = self._cache_call(
            "pull_batch",
            lambda: self.source.pull_batch(
                self.settings.batch_size, version, self.settings.pull_wait_ms, self.settings.name
            ),
        )
        pulled = time.perf_counter()
        if self.metrics is not None:
            self.metrics.phase("data_wait").observe(pulled - start)
        if batch is None or not batch.samples:
            return False
        version_before = self.trainer.version
        stats = self.trainer.train(batch.samples)
        trained = time.perf_counter()
        self._ack(batch.batch_id)
        self.finished = self.trainer.version >= self.settings.steps
        report = self._deliver(self.trainer.version)
        done = time.perf_counter()
        times = {"data_wait": pulled - start, "compute": trained - pulled, "weight_sync": done - trained}
        self._record(
            batch.samples,
            staleness=list(batch.staleness),
            stats=stats,
            report=report,
            times=times,
            version_before=version_before,
        )
        return True

    def _deliver(self, version: int) -> PublishReport | None:
        """Broadcast the weights of `version`, then tell the cache (ordering: replicas first)."""
        report = None
        if self.weights is not None and version > self.weights.latest_version:
            report = self.weights.publish(version, self.trainer.named_weights())
        self._cache_call("publish_version", lambda: self.source.publish_version(version, finished=False))
        self._delivered = version
        return report

    def _run_eval(self) -> None:
        assert self.evaluate is not None
        result = self.evaluate()
        if self.metrics is not None and "accuracy" in result:
            self.metrics.eval_accuracy.set(result["accuracy"])
        self._write({"event": "eval", "version": self.trainer.version, **result})
        log.info("eval at version %d: %s", self.trainer.version, result)

    def _record(
        self,
        samples: list[ScoredSample],
        *,
        staleness: list[int],
        stats: list[StepStats],
        report: PublishReport | None,
        times: dict[str, float],
        version_before: int,
    ) -> None:
        tokens = sum(s.tokens for s in stats)
        last = stats[-1]
        self._last_loss = float(last.metrics.get("loss", 0.0))
        self._tokens_per_second = tokens / max(times["compute"], 1e-9)
        self._steps_run += len(stats)
        m = self.metrics
        if m is not None:
            m.steps.inc(len(stats))
            m.policy_version.set(self.trainer.version)
            m.trained_tokens.inc(tokens)
            m.trained_samples.inc(len(samples))
            m.batch_size.observe(len(samples))
            m.loss.set(self._last_loss)
            m.kl.set(float(last.metrics.get("kl", 0.0)))
            m.grad_norm.set(last.grad_norm)
            if "ratio_mean" in last.metrics:
                m.importance_ratio_mean.set(last.metrics["ratio_mean"])
                m.importance_ratio_max.set(last.metrics["ratio_max"])
            m.clipped_fraction.set(last.metrics.get("clipped_fraction", 0.0))
            m.masked_fraction.set(last.metrics.get("masked_fraction", 0.0))
            m.phase("compute").observe(times["compute"])
            m.phase("weight_sync").observe(times["weight_sync"])
            if report is not None:
                m.broadcast_seconds.observe(report.sync_seconds)
                m.broadcast_bytes.inc(report.nbytes)
                m.broadcast_receivers.set(report.replicas)
        self._write(
            {
                "event": "step",
                "version": self.trainer.version,
                "version_before": version_before,
                "time_unix": time.time(),
                "samples": len(samples),
                "tokens": tokens,
                "optimizer_steps": len(stats),
                "lr": last.lr,
                "grad_norm": last.grad_norm,
                **{k: v for k, v in last.metrics.items()},
                "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
                "staleness_max": max(staleness) if staleness else 0,
                "staleness_hist": {str(s): n for s, n in sorted(Counter(staleness).items())},
                "seconds": times,
                "broadcast": None
                if report is None
                else {"replicas": report.replicas, "bytes": report.nbytes, "seconds": report.sync_seconds},
                **({"sample_ids": [s.rollout.sample_id for s in samples]} if self.settings.log_sample_ids else {}),
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log_record(record)
        if self.step_log is None:
            return
        with self.step_log.open("a") as f:
            f.write(json.dumps(record) + "\n")


def checkpointer(trainer: Trainer, directory: str, *, tokenizer: Any = None, keep: int = 2) -> SaveCheckpoint:
    """A SaveCheckpoint bound to the trainer's model and state."""

    def save() -> Path:
        path = checkpoint.save(directory, trainer.model, trainer.state_dict(), tokenizer=tokenizer, keep=keep)  # type: ignore[arg-type]
        log.info("checkpoint %s (version %d)", path, trainer.version)
        return path

    return save
