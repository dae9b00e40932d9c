"""The experience store: admission, teacher queue, the finite score cache and batch claims, in Redis.

`ExperienceStore` is the cache service's domain logic. It holds no state of its own that
Redis does not hold (several service processes may share one Redis, and any may restart):
every change is one atomic Lua script (`asyncopd.cache.scripts`) or one stream command. It
stores samples as opaque, already-validated bytes plus the few numbers it needs (oldest token
version, lengths), so it knows nothing of protobuf or tensors; the servicer encodes and
validates. The staleness rules (the admission window, the stale bound) are
`asyncopd.cache.policy`'s: the store computes their numbers there and hands them to the
scripts. It knows the eviction policies and the accounting:

  produced = trained + dropped (by reason) + in_flight

where in_flight = unscored (incl. being scored) + scored + claimed by a learner, each counted
separately in Redis, so the equation is a real consistency check, not a definition.

Redis connection errors are retried with backoff for `retry_s`; past that the call raises
`CacheUnavailable`. When Redis comes back empty (restarted without persistence), the store
re-creates its run state, counts a reset, and treats rollouts answering tickets of the lost
state as produced-then-dropped (reason `lost`): their prompts are handed out again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import redis

from asyncopd.cache import scripts
from asyncopd.cache.policy import StalenessPolicy
from asyncopd.wire.errors import WireError
from asyncopd.wire.rpc import FailedPrecondition, ResourceExhausted

log = logging.getLogger(__name__)

EvictionPolicy = Literal["stalest-first", "lru", "fifo", "backpressure"]
BatchOrder = Literal["oldest-first", "newest-first"]
T = TypeVar("T")


class CacheUnavailable(RuntimeError):
    """Redis could not be reached within the retry window (maps to gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class StorePolicy:
    """The knobs the store enforces (from the run config)."""

    max_staleness: int
    batch_size: int
    byte_budget: int
    eviction: EvictionPolicy = "stalest-first"
    order: BatchOrder = "oldest-first"
    teacher_lease_s: float = 30.0
    prompt_lease_s: float = 120.0
    batch_claim_s: float = 120.0
    retry_s: float = 30.0
    poll_s: float = 0.01


@dataclass(frozen=True)
class Admission:
    """An admission ticket for the dataset position `pos`."""

    ticket: str
    pos: int


@dataclass(frozen=True)
class Admitted:
    tickets: list[Admission]
    version: int
    finished: bool
    reissued_expired: int = 0


@dataclass(frozen=True)
class StoredRollout:
    """A validated rollout as the store keeps it: encoded bytes plus what the store must know."""

    sample_id: str
    ticket: str
    oldest_version: int
    num_tokens: int
    support_size: int  # 0 when the rollout carries no support
    blob: bytes


@dataclass(frozen=True)
class PutOutcome:
    accepted: int
    duplicates: int
    stale: int = 0
    lost: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    evicted_stale: int = 0


@dataclass(frozen=True)
class Claimed:
    """Rollouts handed to a teacher: encoded bytes, and how many were re-deliveries."""

    blobs: list[bytes]
    redelivered: int
    stale_dropped: int = 0  # rollouts beyond the bound, dropped instead of handed out


@dataclass(frozen=True)
class PulledBatch:
    batch_id: str
    version: int
    samples: list[tuple[bytes, bytes]]  # (rollout bytes, scores bytes)
    staleness: list[int]


@dataclass(frozen=True)
class PullOutcome:
    batch: PulledBatch | None
    version: int
    returned: int  # samples of expired claims put back in the pool
    stale_dropped: int


@dataclass
class StoreStats:
    learner_version: int
    admitted: int
    produced: int
    trained: int
    dropped: dict[str, int]
    in_flight: int
    bytes_held: int
    byte_budget: int
    queue_depth: dict[str, int]
    staleness_served: dict[int, int]
    evictions: dict[str, int]
    max_staleness: int
    redis_errors: int
    counters: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    staleness_window: int = 0  # StalenessPolicy.window: samples admitted per learner version


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_map(raw: dict[Any, Any]) -> dict[str, int]:
    return {_s(k): int(v) for k, v in raw.items()}


class ExperienceStore:
    """The cache's state machine over one Redis key prefix (see `asyncopd.cache.scripts`)."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        policy: StorePolicy,
        on_redis_error: Callable[[str], None] | None = None,
    ) -> None:
        """`on_redis_error(reason)` is told of each failed Redis call ("connection" or "timeout")."""
        self.staleness = StalenessPolicy(policy.max_staleness, policy.batch_size)
        self.redis = client
        self.prefix = key_prefix.rstrip(":") + ":"
        self.policy = policy
        self.redis_errors = 0
        self._on_redis_error = on_redis_error
        self._run_id: str | None = None
        # The highest learner version this process has seen published. Versions only go up, so
        # after Redis lost everything it is restored at once (otherwise replicas answering with
        # their current weights would look "from the future" until the learner's next publish).
        self._version_seen = 0
        # The learner version the version-dependent script arguments are computed for first (a
        # guess: a script finding another version answers with it, and the call is rerun).
        self._version_hint = 0
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._retrying(self._ensure_state)

    # -- plumbing -----------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.prefix + name

    def _ensure_state(self) -> None:
        """Create the run state if Redis has none (first start, or Redis lost everything)."""
        created = self.redis.set(self.key("run"), uuid.uuid4().hex[:12], nx=True)
        run_id = _s(self.redis.get(self.key("run")))
        if created and self._run_id is not None:
            self.redis.hincrby(self.key("cnt"), "resets", 1)
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis lost the cache state (run %s -> %s); in-flight work is redone", self._run_id, run_id)
            if self._version_seen > 0:
                self._scripts["publish"](keys=[self.prefix], args=[self._version_seen, 0])
        self._run_id = run_id
        try:
            self.redis.xgroup_create(self.key("q"), scripts.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _retrying(self, op: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.policy.retry_s
        delay = 0.05
        failed = False
        while True:
            try:
                if failed:
                    self._ensure_state()
                return op()
            except redis.AuthenticationError:
                raise  # a wrong password does not heal by retrying (it is a ConnectionError subclass)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.redis_errors += 1
                if self._on_redis_error is not None:
                    self._on_redis_error("timeout" if isinstance(exc, redis.TimeoutError) else "connection")
                failed = True
                if time.monotonic() + delay > deadline:
                    raise CacheUnavailable(f"Redis unreachable for {self.policy.retry_s:.0f}s: {exc}") from exc
                log.warning("Redis error (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ensure_state()  # the stream vanished with the rest of Redis's data

    def _script(self, name: str, args: Sequence[Any]) -> Any:
        """Run Lua script `name`; when it finds the run state gone (Redis lost it), rebuild and rerun."""
        script = self._scripts[name]

        def run() -> Any:
            for _ in range(3):
                res = script(keys=[self.prefix], args=list(args))
                if not (isinstance(res, list) and res and _s(res[0]) == "RESET"):
                    return res
                self._ensure_state()
            raise CacheUnavailable("Redis keeps losing the cache state (is something flushing it?)")

        return self._retrying(run)

    def _at_version(self, name: str, args: Callable[[int], Sequence[Any]], version: int | None = None) -> Any:
        """Run a script whose arguments depend on the learner version (`args(version)`).

        The arguments are computed for `version` (default: the last version seen); the script
        checks that version is still the published one and otherwise answers {'VERSION', v}, and
        the call is rerun for v. Versions move once per learner step, so reruns are rare."""
        ver = self._version_hint if version is None else version
        for _ in range(8):
            res = self._script(name, args(ver))
            if not (isinstance(res, list) and _s(res[0]) == "VERSION"):
                return res
            ver = self._version_hint = int(res[1])
        raise CacheUnavailable(f"the learner version kept moving under {name} (8 reruns); retry")

    def _wait(self, op: Callable[[], T | None], wait_ms: int) -> T | None:
        """Run `op` until it returns non-None or `wait_ms` has passed (at least once)."""
        deadline = time.monotonic() + max(wait_ms, 0) / 1000.0
        while True:
            result = self._retrying(op)
            if result is not None or time.monotonic() >= deadline:
                return result
            time.sleep(self.policy.poll_s)

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    # -- learner version ----------------------------------------------------------------------

    def version(self) -> int:
        """The published learner version (never below one this process saw: versions only go up)."""
        current = self._retrying(lambda: int(self.redis.get(self.key("ver")) or 0))
        self._version_hint = current
        self._version_seen = max(self._version_seen, current)
        return self._version_seen

    def publish_version(self, version: int, finished: bool = False) -> int:
        if version < 0:
            raise ValueError(f"version: {version} is negative")
        res = self._script("publish", [version, int(finished)])
        if _s(res[0]) == "BEHIND":
            raise FailedPrecondition(f"version {version} is behind the published version {int(res[1])}")
        self._version_seen = max(self._version_seen, int(res[1]))
        self._version_hint = int(res[1])
        return int(res[1])

    # -- prompts ------------------------------------------------------------------------------

    def acquire(self, replica: str, max_prompts: int, wait_ms: int = 0) -> Admitted:
        """Admission tickets for up to `max_prompts` dataset positions (re-issues first)."""
        lease_ms = int(self.policy.prompt_lease_s * 1000)

        def once() -> Admitted | None:
            args = [self._now_ms(), replica, max_prompts, self.staleness.window, lease_ms]
            res = self._script("acquire", args)
            tickets = [Admission(_s(res[i]), int(res[i + 1])) for i in range(3, len(res), 2)]
            out = Admitted(tickets, int(res[0]), bool(int(res[1])), int(res[2]))
            return out if tickets or out.finished else None

        got = self._wait(once, wait_ms)
        if got is None or (len(got.tickets) < max_prompts and not got.finished):
            # counted once per request (not per poll): how often producers find admission full
            self._retrying(lambda: self.redis.hincrby(self.key("cnt"), "admission_blocked", 1))
        return got if got is not None else Admitted([], self.version(), False)

    def release(self, replica: str, tickets: Sequence[str]) -> int:
        if not tickets:
            return 0
        return int(self._script("release", [replica, *tickets]))

    # -- rollouts -----------------------------------------------------------------------------

    def _full(self, res: list[Any]) -> ResourceExhausted:
        held, new, budget = int(res[1]), int(res[2]), int(res[3])
        if self.policy.eviction == "backpressure":
            why = "backpressure: retry after the learner consumes"
        else:
            why = f"nothing left to evict under {self.policy.eviction} (unscored and claimed samples stay)"
        return ResourceExhausted(
            f"cache full: {held} bytes held + {new} new > budget {budget}; {why}",
        )

    def put_rollouts(self, rollouts: Sequence[StoredRollout]) -> PutOutcome:
        """Store rollouts and queue them for teachers, atomically (all or nothing)."""
        p = self.policy
        items: list[Any] = []
        for r in rollouts:
            items += [r.sample_id, r.ticket, r.oldest_version, r.num_tokens, r.support_size, r.blob]

        def args(version: int) -> list[Any]:
            bound = self.staleness.oldest_usable(version)
            return [self._now_ms(), version, bound, p.byte_budget, p.eviction, len(rollouts), *items]

        res = self._at_version("put_rollouts", args)
        tag = _s(res[0])
        if tag == "UNKNOWN":
            raise WireError(
                f"rollouts[{int(res[1])}].ticket: unknown ticket {_s(res[2])!r} "
                "(not issued by this cache; answer tickets from AcquirePrompts)"
            )
        if tag == "FULL":
            raise self._full(res)
        return PutOutcome(*(int(x) for x in res[1:8]))

    def claim_rollouts(self, teacher: str, max_rollouts: int, wait_ms: int = 0) -> Claimed:
        """Unscored rollouts for `teacher`: expired leases of other teachers first, then new ones."""
        q, lease_ms = self.key("q"), int(self.policy.teacher_lease_s * 1000)

        def claim() -> Claimed:
            ids: list[tuple[Any, Any]] = []
            start: Any = "0-0"
            redelivered = 0
            while len(ids) < max_rollouts:
                res = self.redis.xautoclaim(
                    q, scripts.GROUP, teacher, lease_ms, start_id=start, count=max_rollouts - len(ids)
                )
                got = [(eid, f) for eid, f in res[1] if f]
                ids += got
                redelivered += len(got)
                start = res[0]
                if _s(start) == "0-0":
                    break
            if len(ids) < max_rollouts:
                block = wait_ms if (not ids and wait_ms > 0) else None
                read: Any = self.redis.xreadgroup(
                    scripts.GROUP, teacher, {q: ">"}, count=max_rollouts - len(ids), block=block
                )
                for _, entries in read or []:
                    ids += [(eid, f) for eid, f in entries if f]
            return self._load_claimed(ids, redelivered)

        return self._retrying(claim)

    def _load_claimed(self, entries: list[tuple[Any, Any]], redelivered: int) -> Claimed:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.key("ver"))
        for _, fields in entries:
            sid = _s(fields.get(b"sid", fields.get("sid", b"")))
            pipe.hmget(self.key(f"s:{sid}"), "r", "st", "ov")
        version_raw, *rows = pipe.execute()
        version = int(version_raw or 0)
        oldest_usable = self.staleness.oldest_usable(version)
        blobs: list[bytes] = []
        dead, stale = [], []
        for (eid, fields), (blob, st, ov) in zip(entries, rows, strict=True):
            if blob is None or _s(st) != "unscored":
                dead.append(eid)  # scored or dropped meanwhile: the queue entry is stale
            elif int(ov) < oldest_usable:
                stale.append(_s(fields.get(b"sid", fields.get("sid", b""))))
            else:
                blobs.append(blob)
        if dead:
            self.redis.xack(self.key("q"), scripts.GROUP, *dead)
            self.redis.xdel(self.key("q"), *dead)
        dropped = 0
        if stale:
            res = self._at_version(
                "drop_stale_unscored", lambda v: [v, self.staleness.oldest_usable(v), *stale], version
            )
            dropped = int(res[1])
        if redelivered:
            self.redis.hincrby(self.key("cnt"), "redelivered", redelivered)
        return Claimed(blobs, redelivered, dropped)

    def sample_shapes(self, sample_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(num_tokens, support_size) of each known, still unscored sample (to validate scores)."""

        def read() -> dict[str, tuple[int, int]]:
            pipe = self.redis.pipeline(transaction=False)
            for sid in sample_ids:
                pipe.hmget(self.key(f"s:{sid}"), "T", "K", "st")
            out = {}
            for sid, (t, k, st) in zip(sample_ids, pipe.execute(), strict=True):
                if t is not None and _s(st) == "unscored":
                    out[sid] = (int(t), int(k))
            return out

        return self._retrying(read)

    def put_scores(self, scores: Sequence[tuple[str, bytes]]) -> PutOutcome:
        """Attach teacher scores (sample_id, encoded bytes); unknown or already scored ones are late."""
        p = self.policy
        items: list[Any] = []
        for sid, blob in scores:
            items += [sid, blob]

        def args(version: int) -> list[Any]:
            bound = self.staleness.oldest_usable(version)
            return [self._now_ms(), version, bound, p.byte_budget, p.eviction, len(scores), *items]

        res = self._at_version("put_scores", args)
        if _s(res[0]) == "FULL":
            raise self._full(res)
        acc, late, stale, ev_n, ev_bytes, ev_stale = (int(x) for x in res[1:7])
        return PutOutcome(acc, late, stale=stale, evicted=ev_n, evicted_bytes=ev_bytes, evicted_stale=ev_stale)

    # -- batches ------------------------------------------------------------------------------

    def pull_batch(self, size: int, learner_version: int, learner: str, wait_ms: int = 0) -> PullOutcome:
        """Claim exactly `size` scored samples no staler than the bound, or none."""
        p = self.policy
        totals = {"returned": 0, "stale": 0, "version": learner_version}
        # The batch is served at learner_version (an older one is refused as BEHIND), so the
        # bound is exact here without a version check.
        oldest_usable = self.staleness.oldest_usable(learner_version)

        def once() -> PulledBatch | None:
            bid = uuid.uuid4().hex
            args = [self._now_ms(), learner_version, oldest_usable, size, p.order, bid, learner]
            res = self._script("pull", [*args, int(p.batch_claim_s * 1000)])
            tag = _s(res[0])
            if tag == "BEHIND":
                raise FailedPrecondition(
                    f"learner_version {learner_version} is behind the published version {int(res[1])}"
                )
            self._version_hint = int(res[1])
            totals["version"], totals["returned"] = int(res[1]), totals["returned"] + int(res[2])
            totals["stale"] += int(res[3])
            if tag == "WAIT":
                return None
            sids = [_s(res[i]) for i in range(4, len(res), 2)]
            ovs = [int(res[i]) for i in range(5, len(res), 2)]
            pipe = self.redis.pipeline(transaction=False)
            for sid in sids:
                pipe.hmget(self.key(f"s:{sid}"), "r", "s")
            samples = [(r, s) for r, s in pipe.execute()]
            return PulledBatch(bid, int(res[1]), samples, [int(res[1]) - ov for ov in ovs])

        batch = self._wait(once, wait_ms)
        return PullOutcome(batch, totals["version"], totals["returned"], totals["stale"])

    def ack_batch(self, batch_id: str) -> int:
        n = int(self._script("ack", [batch_id]))
        if n < 0:
            raise FailedPrecondition(
                f"batch {batch_id!r} is unknown or its claim expired (its samples went back to the pool)"
            )
        return n

    # -- accounting ---------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        def read() -> StoreStats:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.key("ver"))
            pipe.hgetall(self.key("cnt"))
            pipe.hgetall(self.key("drop"))
            pipe.hgetall(self.key("evict"))
            pipe.hgetall(self.key("served"))
            pipe.zcard(self.key("scored"))
            pipe.zcard(self.key("tlease"))
            pipe.llen(self.key("reissue"))
            pipe.xpending(self.key("q"), scripts.GROUP)
            pipe.get(self.key("fin"))
            ver, cnt_raw, drop, evict, served, n_scored, n_leased, n_reissue, pending, fin = pipe.execute()
            cnt = _int_map(cnt_raw)
            unscored, claimed = cnt.get("unscored", 0), cnt.get("claimed", 0)
            scoring = int(pending["pending"]) if pending else 0
            return StoreStats(
                learner_version=int(ver or 0),
                admitted=cnt.get("admitted", 0),
                produced=cnt.get("produced", 0),
                trained=cnt.get("trained", 0),
                dropped=_int_map(drop),
                in_flight=unscored + int(n_scored) + claimed,
                bytes_held=cnt.get("bytes", 0),
                byte_budget=self.policy.byte_budget,
                queue_depth={
                    "prompts_leased": int(n_leased),
                    "prompts_reissue": int(n_reissue),
                    "unscored": unscored - scoring,
                    "scoring": scoring,
                    "scored": int(n_scored),
                    "claimed": claimed,
                },
                staleness_served={int(k): v for k, v in _int_map(served).items()},
                evictions=_int_map(evict),
                max_staleness=self.policy.max_staleness,
                redis_errors=self.redis_errors,
                counters=cnt,
                finished=_s(fin or b"0") == "1",
                staleness_window=self.staleness.window,
            )

        return self._retrying(read)
