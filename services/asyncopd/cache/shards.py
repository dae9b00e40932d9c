"""Several cache shards in one Redis (or Redis Cluster): `cache.shards` independent keyspaces.

Each shard is an `ExperienceStore` over its own hash-tagged prefix (`payload.shard_prefix`), so
on a Redis Cluster every key one script touches (the payload frames its producers wrote
included) lies in one slot, and different shards may live on different masters. A shard has its
own admission (its share of the window, its dataset positions: those = shard mod shards), its own
teacher queue, scored pool, byte budget and accounting; nothing is shared between them, so no
operation needs two shards at once. `ShardedStore` routes each call:

- AcquirePrompts and ClaimRollouts ask the shards round-robin until the request is filled; a
  waiting request sleeps on the wake-ups of all shards at once (they share one `WakeUps`) and
  asks them all again when any of them wakes it;
- PutRollouts by the ticket's shard (`s<i>.` ahead of the run id), PutScores by the shard in the
  frame key's hash tag (the scores sit next to their rollout), acks by the batch id's `s<i>.`;
- PullBatch takes a whole batch from one shard, round-robin (a batch never spans shards, so its
  claim, ack and expiry stay atomic); a new learner version is published to every shard first;
- Stats add the shards up (the accounting holds per shard, so it holds for the sum).

It knows nothing of protobuf; the byte budget is per shard (`cache.byte_budget_mb` / shards).
A learner's start fences every shard (one epoch for all: the highest any shard hands out). The
prompt cursor a checkpoint records is one `CursorState` in dataset positions: one past the
highest position any shard handed out, with every position below it that is still open (or that
a lagging shard never handed out) listed open; restoring splits it back per shard. Anything else
not sharded acts on shard 0 (`__getattr__`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis

from asyncopd.cache.store import (
    Admitted,
    Claimed,
    ExperienceStore,
    Gone,
    LearnerStart,
    PullOutcome,
    PutOutcome,
    StoredRollout,
    StoredScores,
    StorePolicy,
    StoreStats,
    WakeUps,
    shape_mismatch,
    sum_claims,
    sum_pulls,
    wait_any,
)
from asyncopd.records import CursorState
from asyncopd.wire import payload
from asyncopd.wire.errors import WireError


def _sum_outcomes(outs: Sequence[PutOutcome]) -> PutOutcome:
    fields = ("accepted", "duplicates", "stale", "lost", "evicted", "evicted_bytes", "evicted_stale")
    return PutOutcome(*(sum(getattr(o, f) for o in outs) for f in fields))


class ShardedStore:
    """`shards` `ExperienceStore`s over one client, with requests routed as the module says."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        policy: StorePolicy,
        shards: int,
        on_redis_error: Callable[[str], None] | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        per_shard = replace(policy, byte_budget=max(1, policy.byte_budget // shards))
        wakeups = WakeUps()  # one for all shards: a request waits on all of them (`wait_any`)
        self.stores = [
            ExperienceStore(client, key_prefix, per_shard, on_redis_error, shard=i, shards=shards, wakeups=wakeups)
            for i in range(shards)
        ]
        self.policy = policy
        self.redis = client
        self.key_prefix = key_prefix
        self.staleness = self.stores[0].staleness
        self._turn = itertools.count()
        self._published = 0

    def __getattr__(self, name: str) -> Any:
        # Operations not sharded yet (see the module docstring) act on shard 0.
        return getattr(self.stores[0], name)

    def _rotation(self) -> list[ExperienceStore]:
        start = next(self._turn) % len(self.stores)
        return self.stores[start:] + self.stores[:start]

    def _shard(self, index: int | None, what: str) -> ExperienceStore:
        if index is None or not 0 <= index < len(self.stores):
            raise WireError(f"{what} does not belong to any of the {len(self.stores)} cache shards")
        return self.stores[index]

    # -- learner version ----------------------------------------------------------------------

    def version(self) -> int:
        return max(s.version() for s in self.stores)

    def known_version(self) -> int:
        return max(s.known_version() for s in self.stores)

    def begin_learner(self, has_checkpoint: bool, checkpoint_version: int, saved: CursorState | None) -> LearnerStart:
        """A new fencing epoch on every shard (older learners' claims expire everywhere), raised to
        the highest of them on all shards, so the learner holds one epoch the shards all accept."""
        starts = [
            s.begin_learner(has_checkpoint, checkpoint_version, None if saved is None else self._split(saved, i))
            for i, s in enumerate(self.stores)
        ]
        epoch, published = max(st.epoch for st in starts), max(st.published for st in starts)
        self.publish_version(published, epoch=epoch)  # a shard below `epoch` moves up to it
        restored = sum(st.cursor_restored for st in starts)
        return LearnerStart(epoch, published, max(st.start_version for st in starts), restored)

    def _split(self, state: CursorState, shard: int) -> CursorState:
        """Shard `shard`'s part of a cursor state in dataset positions (its positions = shard mod n)."""
        n = len(self.stores)
        local = max(0, -(-(state.cursor - shard) // n))  # its positions below the cursor
        runs = (state.runs[shard],) if len(state.runs) == n else ()
        return CursorState(local, tuple((p - shard) // n for p in state.open if p % n == shard), runs)

    def restore_cursor(self, epoch: int, saved: CursorState | None, trained_tickets: Sequence[str] = ()) -> int:
        return sum(
            s.restore_cursor(
                epoch,
                None if saved is None else self._split(saved, i),
                [t for t in trained_tickets if payload.ticket_shard(t) == i],
            )
            for i, s in enumerate(self.stores)
        )

    def run_state(self) -> tuple[tuple[str, ...], bool]:
        """Each shard's run id (shard order), and whether any holds fresh admission for a restore."""
        states = [s.run_state() for s in self.stores]
        return tuple(run for runs, _ in states for run in runs), any(held for _, held in states)

    def cursor_state(
        self,
        epoch: int,
        trained_batches: Sequence[str],
        saved: CursorState | None = None,
        trained_tickets: Sequence[str] = (),
    ) -> CursorState:
        """One cursor state over all shards, in dataset positions (see the module docstring)."""
        n = len(self.stores)
        parts = [
            s.cursor_state(
                epoch,
                [b for b in trained_batches if payload.ticket_shard(b) == i],
                None if saved is None else self._split(saved, i),
                [t for t in trained_tickets if payload.ticket_shard(t) == i],
            )
            for i, s in enumerate(self.stores)
        ]
        # one past the highest position any shard handed out
        cursor = max(((part.cursor - 1) * n + i + 1 for i, part in enumerate(parts) if part.cursor > 0), default=0)
        open_: set[int] = set()
        for i, part in enumerate(parts):
            open_ |= {p * n + i for p in part.open}
            open_ |= set(range(part.cursor * n + i, cursor, n))  # not handed out by this shard yet
        return CursorState(cursor, tuple(sorted(open_)), tuple(part.runs[0] if part.runs else "" for part in parts))

    def publish_version(self, version: int, finished: bool = False, **kwargs: Any) -> int:
        out = max(s.publish_version(version, finished, **kwargs) for s in self.stores)
        self._published = max(self._published, out)
        return out

    # -- prompts and rollouts -----------------------------------------------------------------

    def acquire(self, replica: str, max_prompts: int, wait_ms: int = 0, gone: Gone = None) -> Admitted:
        tries: list[Admitted] = []

        def once() -> Admitted | None:
            got: list[Any] = []
            version, finished, reissued = self._published, False, 0
            for store in self._rotation():
                last = store.acquire_once(replica, max_prompts - len(got))
                got, version, finished = got + last.tickets, max(version, last.version), last.finished
                reissued += last.reissued_expired
                if len(got) >= max_prompts or finished:
                    break
            tries.append(Admitted(got, version, finished, reissued))
            return tries[-1] if got or finished else None

        wait_any(self.stores, once, wait_ms, "prompts", gone)
        if not tries:  # its caller went away before it ran (`wait_any`)
            return Admitted([], self.known_version(), False, 0)
        return self.stores[0].admission_outcome(tries[-1], max_prompts)

    def release(self, replica: str, tickets: Sequence[str]) -> int:
        by_shard: dict[int, list[str]] = {}
        for t in tickets:
            by_shard.setdefault(payload.ticket_shard(t) or 0, []).append(t)
        return sum(self._shard(i, "ticket").release(replica, ts) for i, ts in by_shard.items())

    def put_rollouts(self, rollouts: Sequence[StoredRollout]) -> PutOutcome:
        """Each shard's rollouts in one script (all or nothing per shard)."""
        by_shard: dict[int, list[StoredRollout]] = {}
        for i, r in enumerate(rollouts):
            shard = payload.ticket_shard(r.ticket)
            self._shard(shard, f"rollouts[{i}].ticket {r.ticket!r}")
            by_shard.setdefault(shard or 0, []).append(r)
        return _sum_outcomes([self.stores[i].put_rollouts(rs) for i, rs in by_shard.items()])

    def write_frames(self, frames: Sequence[tuple[str, bytes | bytearray]]) -> None:
        self.stores[0].write_frames(frames)

    def read_frames(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.stores[0].read_frames(keys)

    # -- teachers -----------------------------------------------------------------------------

    def claim_rollouts(self, teacher: str, max_rollouts: int, wait_ms: int = 0, gone: Gone = None) -> Claimed:
        tries: list[Claimed] = []

        def once() -> Claimed | None:
            got = 0
            for store in self._rotation():
                tries.append(store.claim_once(teacher, max_rollouts - got))
                got += len(tries[-1].samples)
                if got >= max_rollouts:
                    break
            return sum_claims(tries) if got else None

        wait_any(self.stores, once, wait_ms, "rollouts", gone)
        return sum_claims(tries)

    def sample_shapes(self, sample_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for store in self.stores:
            out.update(store.sample_shapes(sample_ids))
        return out

    def put_scores(self, scores: Sequence[StoredScores]) -> PutOutcome:
        """Each shard's scores in one script. A shard's script refuses a declared shape that is not
        its rollout's before writing; a request over several shards is checked on all of them
        first, so a bad one stores nothing anywhere."""
        by_shard: dict[int, list[StoredScores]] = {}
        for i, sc in enumerate(scores):
            shard = payload.key_shard(sc.payload.key, self.key_prefix)
            self._shard(shard, f"scores[{i}].payload.key {sc.payload.key!r}")
            by_shard.setdefault(shard or 0, []).append(sc)
        declared = [sc for sc in scores if sc.shape is not None]
        if len(by_shard) > 1 and declared:
            stored = self.sample_shapes([sc.sample_id for sc in declared])
            for sc in declared:
                shape = stored.get(sc.sample_id)
                if shape is not None and sc.shape is not None and sc.shape != shape:
                    raise shape_mismatch(sc.sample_id, sc.shape, shape)
        return _sum_outcomes([self.stores[i].put_scores(ss) for i, ss in by_shard.items()])

    def refuse_unscored(self, refused: dict[str, str]) -> int:
        return sum(store.refuse_unscored(refused) for store in self.stores)

    # -- batches ------------------------------------------------------------------------------

    def pull_batch(
        self, size: int, learner_version: int, learner: str, wait_ms: int = 0, gone: Gone = None, **kwargs: Any
    ) -> PullOutcome:
        """A whole batch from one shard (round-robin); every shard learns a new version first.
        `size` 0 (keep-alive of kept batches) goes to every shard: each extends the batches it holds."""
        if size == 0:
            outs0 = [store.pull_batch(0, learner_version, learner, **kwargs) for store in self.stores]
            return PullOutcome(None, max(o.version for o in outs0), 0, 0)
        if learner_version > self._published:
            for store in self.stores:
                store.publish_version(learner_version, **{k: v for k, v in kwargs.items() if k == "epoch"})
            self._published = learner_version
        tries: list[PullOutcome] = []

        def once() -> PullOutcome | None:
            for store in self._rotation():
                tries.append(store.pull_once(size, learner_version, learner, **kwargs))
                if tries[-1].batch is not None:
                    return tries[-1]
            return None

        wait_any(self.stores, once, wait_ms, "batch", gone)
        return sum_pulls(tries)

    def _batch_shard(self, batch_id: str) -> ExperienceStore:
        return self._shard(payload.ticket_shard(batch_id), f"batch {batch_id!r}")

    def note_refused(self, batch_id: str, refused: dict[str, str]) -> None:
        self._batch_shard(batch_id).note_refused(batch_id, refused)

    def ack_batch(self, batch_id: str, refused: dict[str, str] | None = None, **kwargs: Any) -> int:
        return self._batch_shard(batch_id).ack_batch(batch_id, refused, **kwargs)

    # -- accounting ---------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        parts = [s.stats() for s in self.stores]

        def add(maps: Sequence[dict[Any, int]]) -> dict[Any, int]:
            total: Counter[Any] = Counter()
            for m in maps:
                total.update(m)
            return dict(total)

        first = parts[0]
        return replace(
            first,
            learner_version=max(p.learner_version for p in parts),
            admitted=sum(p.admitted for p in parts),
            produced=sum(p.produced for p in parts),
            trained=sum(p.trained for p in parts),
            dropped=add([p.dropped for p in parts]),
            in_flight=sum(p.in_flight for p in parts),
            bytes_held=sum(p.bytes_held for p in parts),
            byte_budget=self.policy.byte_budget,
            queue_depth=add([p.queue_depth for p in parts]),
            staleness_served=add([p.staleness_served for p in parts]),
            evictions=add([p.evictions for p in parts]),
            redis_errors=sum(p.redis_errors for p in parts),
            counters=add([p.counters for p in parts]),
            finished=all(p.finished for p in parts),
        )

    def close(self) -> None:
        for store in self.stores:
            store.close()
