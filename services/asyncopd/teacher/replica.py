"""A teacher replica's domain logic: the scorer shared by direct requests and the cache loop.

`TeacherReplica` records metrics around a scoring backend's `score` (`teacher.scorer.Scorer`:
torch or vLLM); `TeacherLoop` claims unscored rollouts from the cache, scores them and puts
the scores, until `stop` is set (the pull loop
of `asyncopd.wire.work_loop`). Claimed work that is never scored is re-delivered by the cache
after the teacher lease, so a crash here loses nothing. It knows the scorer and the cache
client; it knows nothing of gRPC servers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from asyncopd.observability.metrics import TeacherMetrics
from asyncopd.records import Rollout, TeacherScores
from asyncopd.teacher.scorer import Scorer
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import Outage
from asyncopd.wire.work_loop import Claimed, run_work_loop

log = logging.getLogger(__name__)


class TeacherReplica:
    def __init__(self, scorer: Scorer, name: str, metrics: TeacherMetrics | None = None) -> None:
        self.scorer = scorer
        self.name = name
        self._metrics = metrics

    def score(self, rollouts: Sequence[Rollout], topk: int, tail: bool) -> list[TeacherScores]:
        start = time.monotonic()
        scores = self.scorer.score(rollouts, topk, tail)
        if self._metrics is not None:
            self._metrics.scoring_seconds.observe(time.monotonic() - start)
            self._metrics.batch_size.observe(len(rollouts))
            self._metrics.scored_samples.inc(len(rollouts))
            self._metrics.scored_tokens.inc(sum(r.num_tokens for r in rollouts))
        return scores


class TeacherLoop:
    """Claim → score → put, until `stop` is set."""

    def __init__(
        self,
        replica: TeacherReplica,
        cache: CacheClient,
        *,
        topk: int,
        tail: bool,
        claim_batch: int,
        wait_ms: int = 500,
        metrics: TeacherMetrics | None = None,
    ) -> None:
        self._replica = replica
        self._cache = cache
        self._topk = topk
        self._tail = tail
        self._claim_batch = claim_batch
        self._wait_ms = wait_ms
        self._metrics = metrics
        self.scored = 0

    def run(self, stop: threading.Event) -> None:
        # unsent scores are not given back: the cache re-delivers the claims after the lease
        run_work_loop(
            stop,
            Outage(f"{self._replica.name}: the cache"),
            claim=self._claim,
            work=lambda rollouts: self._replica.score(rollouts, self._topk, self._tail),
            put=self._put,
        )

    def _claim(self) -> Claimed[Rollout]:
        start = time.monotonic()
        rollouts = self._cache.claim_rollouts(self._replica.name, self._claim_batch, self._wait_ms)
        if self._metrics is not None:
            self._metrics.claim_wait_seconds.inc(time.monotonic() - start)
        return Claimed(rollouts)

    def _put(self, scores: list[TeacherScores]) -> None:
        self._cache.put_scores(scores)
        self.scored += len(scores)
