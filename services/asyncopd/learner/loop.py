"""The learner's training loop: pull a versioned batch -> train -> publish weights -> publish version,
and every N versions: checkpoint -> ack the batches it saved.

Each iteration pulls up to `batch_size` scored samples no staler than the cache's bound,
runs the trainer's optimizer step(s) (version += steps), broadcasts the new weights to the
rollout replicas, and then tells the cache the new version (so admission control and staleness
accounting use it). Every step is recorded in the Prometheus metrics and as one JSON line (the
launcher builds the report and plots from that file); checkpoints and evaluations happen every
N versions, and a final checkpoint when the loop stops (SIGTERM or the configured number of steps).

"Trained" means saved. A batch is acked (the cache counts its samples trained and deletes
them) only once a checkpoint holds the update that consumed it: until then the loop keeps the
batch's claim alive (every pull names the batches trained since the last checkpoint; the cache
extends their claims and frees their admission slots) and acks them, in order, right after the
checkpoint is written. If the process dies in between, the claims expire and the samples go back
to the pool (where the restarted learner's version jump makes them stale: dropped, counted), so
no sample is counted trained whose update was lost. With `checkpoint_every` = 0 (or no
checkpoints at all) there is nothing to wait for and each batch is acked right after training.

The checkpoint also records the prompt cursor state (`CursorState`: the next dataset position
and the positions below it still open), which the cache restores if Redis lost its state: a run
resumed after a Redis wipe neither replays nor skips prompts.

Every start takes a fencing epoch from the cache (`begin`); every pull, ack and publish carries
it, and a learner whose epoch is older than the newest is refused (PERMISSION_DENIED): it stops
at once (`LearnerFenced`), without a checkpoint and without acking.

A checkpoint that fails for lack of space or any OSError (disk full, EACCES, a read-only
volume: `CheckpointSpaceError` is one) does not stop the learner and does not let it train on:
it counts the failure (`checkpoint_failures`, the checkpoint alerts), logs the directory and the
bytes the checkpoint needs, and waits, retrying the checkpoint with backoff (up to
`checkpoint_retry_max_s`) while it keeps the unsaved batches' claims alive (a keep-alive
PullBatch: see `_keep_claims`); once a checkpoint is written it acks them and trains on. A stop
while it waits makes one last attempt; if that fails too the loop ends without acking (the claims
expire and the samples go back to the pool, the accounting exact) and without publishing
`finished`. Other exceptions from the checkpoint propagate.

Faults it rides through: the cache (or its Redis) being unreachable for a while (every cache
call is retried with backoff until it answers or the loop is stopped); an ack the cache refuses
because it no longer knows the claim (Redis lost it, or it expired) — logged and counted, the
cache owns those samples' accounting; and a restart (from a checkpoint, or after another
learner of the run): it starts at the version the cache names, max(published, checkpoint) +
max_staleness + 2 (`asyncopd.cache.policy`), past every version a replica may have stamped
tokens with, so versions stay monotonic and no rollout of lost weights looks fresh; it logs a
`start` event naming the checkpoint it resumed from and the jump (steps logged after that
checkpoint by the previous incarnation were lost with it).

It knows the trainer, the cache client, a `WeightTransport` (not which backend moves the bytes)
and the checkpoint files; the gRPC server and process signals belong to `asyncopd.learner.main`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from asyncopd.learner import checkpoint
from asyncopd.learner.servicer import Progress
from asyncopd.learner.trainer import StepStats, Trainer
from asyncopd.observability.metrics import LearnerMetrics
from asyncopd.records import CursorState, ScoredSample
from asyncopd.tracking import Tracker
from asyncopd.weightsync.transport import PublishReport, WeightTransport
from asyncopd.wire.cache_client import LearnerStart
from asyncopd.wire.rpc import Outage, retryable

log = logging.getLogger(__name__)

T = TypeVar("T")

# The most trained batches kept unacked: past this many the loop checkpoints early (each pull
# names them all, and the cache accepts at most 4096).
MAX_UNSAVED_BATCHES = 1024


class LearnerFenced(RuntimeError):
    """A newer learner began in this run (the cache refused this one's epoch): stop, save nothing."""


class BatchSource(Protocol):
    """What the loop needs of the cache (asyncopd.wire.cache_client.CacheClient fits); the client
    holds the fencing epoch `begin_learner` took and sends it with every later call."""

    def begin_learner(
        self, learner: str = "learner", checkpoint_version: int | None = None, cursor: CursorState | None = None
    ) -> LearnerStart: ...
    def prompt_cursor(
        self, trained_batch_ids: Sequence[str], saved: CursorState | None = None, trained_tickets: Sequence[str] = ()
    ) -> CursorState: ...
    def run_state(self) -> tuple[tuple[str, ...], bool]: ...
    def pull_batch(
        self, size: int, learner_version: int, wait_ms: int = 0, learner: str = "learner", keep: Sequence[str] = ()
    ) -> Any: ...
    def ack_batch(self, batch_id: str) -> int: ...
    def publish_version(self, version: int, finished: bool = False) -> int: ...


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
    # Longest back-off between retries of a checkpoint that failed with an OSError (disk full,
    # unwritable): the unsaved batches' claims are renewed before each wait, so keep it well
    # under cache.batch_claim_s.
    checkpoint_retry_max_s: float = 2.0


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
        self.checkpoint_failures = 0
        self.start: LearnerStart | None = None  # what the cache answered at `begin`
        # Batches trained since the last checkpoint, oldest first: acked once one saves them.
        self.unsaved: list[str] = []
        self._unsaved_tickets: dict[str, list[str]] = {}  # batch id -> its samples' tickets
        saved = trainer.prompt_cursor
        self._saved_cursor = CursorState.from_dict(saved) if saved else None
        # the cache run states (one per shard) the learner's cursor knowledge belongs to; a pull
        # naming others means Redis lost its state since (see `_follow_run_state`)
        self._cursor_runs: tuple[str, ...] = self._saved_cursor.runs if self._saved_cursor else ()
        self.cursor_restores = 0
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

    @property
    def acks_deferred(self) -> bool:
        """Whether batches are acked after the checkpoint that saves them (else right after training)."""
        return self.save_checkpoint is not None and self.settings.checkpoint_every > 0

    def run(self) -> None:
        """Train until `steps` versions or `stop`; always ends with a checkpoint (which acks every
        batch trained since the previous one) and the version published. Raises `LearnerFenced`
        (after neither checkpointing nor acking) when a newer learner began."""
        fenced = False
        try:
            self.begin()
            self.finished = self.trainer.version >= self.settings.steps
            self._deliver(self.trainer.version)  # replicas (and a restarted cache) start from our version
            if self.metrics is not None:
                self.metrics.target_steps.set(self.settings.steps)
                self.metrics.policy_version.set(self.trainer.version)
            last_checkpoint = self.trainer.version
            saved = True
            clean = False
            try:
                while not self.stop.is_set() and not self.finished:
                    if not self._iteration():
                        continue
                    version = self.trainer.version
                    every = self.settings.checkpoint_every
                    due = every and version // every > last_checkpoint // every
                    if self.save_checkpoint is not None and (due or len(self.unsaved) >= MAX_UNSAVED_BATCHES):
                        if not self._checkpoint_until_saved(retry=True):
                            break  # stopped while waiting for space: the final attempt below
                        last_checkpoint = version
                    if (
                        self.evaluate is not None
                        and self.settings.eval_every
                        and version % self.settings.eval_every == 0
                    ):
                        self._run_eval()
                clean = True
            except grpc.RpcError as err:
                fenced = err.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
                raise
            finally:
                if (
                    not fenced
                    and self.save_checkpoint is not None
                    and (self.trainer.version != last_checkpoint or self.unsaved)
                ):
                    # finished: wait for space like any checkpoint; stopped or failing: one attempt
                    saved = self._checkpoint_until_saved(retry=clean and not self.stop.is_set())
            if not saved:
                log.error(
                    "learner stopping without a checkpoint: %d trained batches left unacked; their claims "
                    "expire and their samples go back to the pool (not counted trained)",
                    len(self.unsaved),
                )
            elif self.finished:
                version = self.trainer.version
                self._cache_call("publish_version", lambda: self.source.publish_version(version, finished=True))
                log.info("training finished at version %d", self.trainer.version)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
                raise
            log.error("learner fenced out, stopping without a checkpoint: %s", err.details())  # type: ignore[attr-defined]
            raise LearnerFenced(str(err.details())) from err  # type: ignore[attr-defined]
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def begin(self) -> None:
        """Take this start's fencing epoch and the version to start at from the cache (see the
        module doc), handing it the checkpoint's prompt cursor state; log a start event."""
        resumed, cursor = self.resumed_from, self._saved_cursor
        start = self._cache_call(
            "begin_learner", lambda: self.source.begin_learner(self.settings.name, resumed, cursor)
        )
        self.start = start
        before = self.trainer.version
        if start.start_version > before:
            log.warning(
                "restarted learner (checkpoint version %s, published version %d): starting at version %d, "
                "past every version a replica may have stamped tokens with (max(published, checkpoint) + "
                "max_staleness + 2); in-flight rollouts of earlier weights are stale from now on",
                resumed,
                start.published,
                start.start_version,
            )
            self.trainer.version = start.start_version
            # the jump goes to the cache first: replicas take a pushed version only up to published + 1
            jumped = start.start_version
            self._cache_call("publish_version", lambda: self.source.publish_version(jumped))
        if start.cursor_restored:
            log.warning("the cache had lost its prompt cursor: %d positions re-opened from the checkpoint",
                        start.cursor_restored)  # fmt: skip
        self._write(
            {
                "event": "start",
                "version": self.trainer.version,
                "checkpoint_version": resumed,
                "published_version": start.published,
                "version_jump": self.trainer.version - before,
                "learner_epoch": start.epoch,
                "cursor_restored": start.cursor_restored,
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

    def _checkpoint_until_saved(self, *, retry: bool) -> bool:
        """`_checkpoint()`; while it fails with an OSError (no space, unwritable directory) and
        `retry`, keep the unsaved batches' claims alive and try again with backoff until it is
        written (True) or the loop is stopped (one last attempt; False if that fails too).
        Nothing is trained meanwhile: the caller runs no step before this returns."""
        delay, waited = 0.5, 0.0
        while True:
            try:
                self._checkpoint()
            except OSError as err:
                self.checkpoint_failures += 1
                if not retry or self.stop.is_set():
                    log.error("checkpoint failed (%s); not retrying: the loop is stopping", err)
                    return False
                if waited == 0.0:
                    log.error(
                        "checkpoint failed, training paused until one is written (retrying with backoff, "
                        "the claims of %d unsaved batches kept alive): %s%s",
                        len(self.unsaved),
                        err,
                        self._space_hint(),
                    )
                self._keep_claims()
                wait = min(delay, self.settings.checkpoint_retry_max_s)
                self.stop.wait(wait)
                waited += wait
                delay *= 2
                continue
            if waited:
                log.warning("checkpoint written after %.1f s of failed attempts; training resumes", waited)
            return True

    def _space_hint(self) -> str:
        """Where the checkpoint goes and what it needs, when the saver says (`checkpointer` does)."""
        where = getattr(self.save_checkpoint, "directory", None)
        need = getattr(self.save_checkpoint, "needed_bytes", None)
        if where is None:
            return ""
        hint = f" (checkpoint directory {where}"
        if callable(need):
            with contextlib.suppress(OSError):
                hint += f", ~{need() / 2**20:.1f} MiB needed"
        return hint + ")"

    def _keep_claims(self) -> None:
        """Renew the claims of the unsaved batches without claiming a new one: a PullBatch of size
        0 naming them (keep-alive only: the cache extends those claims, claims nothing and leaves
        the version alone)."""
        if not self.unsaved or self.stop.is_set():
            return
        keep = list(self.unsaved)
        version = self.trainer.version
        try:
            self._cache_call(
                "pull_batch (keep-alive)",
                lambda: self.source.pull_batch(0, version, 0, self.settings.name, keep),
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.PERMISSION_DENIED or not self.stop.is_set():  # type: ignore[attr-defined]
                raise

    def _checkpoint(self) -> None:
        """Write a checkpoint with the prompt cursor state, then ack the batches it saves, oldest
        first. Its time and its failures go to the metrics (the checkpoint-age and
        checkpoint-failure alerts), a failure still propagates (and nothing is acked)."""
        assert self.save_checkpoint is not None
        trained, tickets = list(self.unsaved), self._trained_tickets()
        saved = self._saved_cursor
        cursor = self._cache_call("prompt_cursor", lambda: self.source.prompt_cursor(trained, saved, tickets))
        self._cursor_runs = cursor.runs or self._cursor_runs
        self.trainer.prompt_cursor = cursor.as_dict()
        try:
            self.save_checkpoint()
        except Exception:
            if self.metrics is not None:
                self.metrics.checkpoint_failures.inc()
            raise
        self._saved_cursor = cursor
        if self.metrics is not None:
            self.metrics.checkpoint_unixtime.set(time.time())
        while self.unsaved:
            self._ack(self.unsaved[0])
            self._unsaved_tickets.pop(self.unsaved.pop(0), None)

    def _trained_tickets(self) -> list[str]:
        """Tickets of the unsaved batches' samples, all of them: the store leaves out those of its
        current run. (Filtering here by the runs the last pull reported was wrong: a checkpoint
        right after a wipe still sees the old run there, so the trained tickets were not sent and
        their positions re-opened — 160 positions trained twice in a CI chaos run.)"""
        return [t for bid in self.unsaved for t in self._unsaved_tickets.get(bid, [])]

    def _follow_run_state(self) -> None:
        """After a pull: when the cache reports run states other than the ones this learner's
        cursor knowledge belongs to (Redis lost its state since) or fresh admission held for it,
        hand the cache the checkpoint's cursor state and the tickets trained since, at once (not
        at the next checkpoint): until then a re-created state admits nothing, so the run neither
        replays the prompts it trained nor waits for a checkpoint that cannot come."""
        runs, held = self.source.run_state()
        if not runs:
            return
        if not self._cursor_runs and not held:
            self._cursor_runs = runs  # first sight of the run (no checkpoint yet)
            return
        if not held and runs == self._cursor_runs:
            return
        trained, tickets, saved = list(self.unsaved), self._trained_tickets(), self._saved_cursor
        cursor = self._cache_call("prompt_cursor (restore)", lambda: self.source.prompt_cursor(trained, saved, tickets))
        self._cursor_runs = cursor.runs or runs
        self.cursor_restores += 1
        log.warning(
            "the cache's run state changed (Redis lost it): prompt cursor handed back from %s, %d tickets "
            "trained since kept closed; the cursor is at %d",
            "the last checkpoint" if saved is not None else "nothing (no checkpoint yet)",
            len(tickets),
            cursor.cursor,
        )

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
        keep = list(self.unsaved)
        batch = self._cache_call(
            "pull_batch",
            lambda: self.source.pull_batch(
                self.settings.batch_size, version, self.settings.pull_wait_ms, self.settings.name, keep
            ),
        )
        pulled = time.perf_counter()
        if self.metrics is not None:
            self.metrics.phase("data_wait").observe(pulled - start)
        self._follow_run_state()
        if batch is None or not batch.samples:
            return False
        version_before = self.trainer.version
        stats = self.trainer.train(batch.samples)
        trained = time.perf_counter()
        if self.acks_deferred:
            self.unsaved.append(batch.batch_id)
            self._unsaved_tickets[batch.batch_id] = [s.rollout.ticket for s in batch.samples]
        else:
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
    """A SaveCheckpoint bound to the trainer's model and state (with `directory` and
    `needed_bytes()` attributes, which the loop names when a checkpoint fails)."""

    def save() -> Path:
        path = checkpoint.save(directory, trainer.model, trainer.state_dict(), tokenizer=tokenizer, keep=keep)  # type: ignore[arg-type]
        log.info("checkpoint %s (version %d)", path, trainer.version)
        return path

    def needed() -> int:
        return int(checkpoint.needed_bytes(Path(directory), trainer.model) * checkpoint.SPACE_MARGIN)  # type: ignore[arg-type]

    save.directory = directory  # type: ignore[attr-defined]
    save.needed_bytes = needed  # type: ignore[attr-defined]
    return save
