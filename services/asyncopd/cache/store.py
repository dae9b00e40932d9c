"""The experience store: admission, teacher queue, the finite score cache and batch claims, in Redis.

`ExperienceStore` is the cache service's domain logic. It holds no state of its own that
Redis does not hold (several service processes may share one Redis, and any may restart):
every change is one atomic Lua script (`asyncopd.cache.scripts`). It
stores sample metadata only (oldest token version, lengths, byte counts, checksums, and the keys
of the payload frames its producers wrote to Redis themselves, `asyncopd.wire.payload_store`),
so no payload byte passes through it or through a script argument: a put checks each frame
exists with the declared length and makes it permanent, and removing a sample (trained,
dropped, evicted) deletes its frames in the same script. It knows nothing of protobuf or
tensors; the servicer parses and validates. `write_frames`/`read_frames` serve the servicer's
inline path (clients without Redis access): the servicer encodes there, the store only moves
bytes. The staleness rules (the admission window, the stale bound) are
`asyncopd.cache.policy`'s: the store computes their numbers there and hands them to the
scripts. It knows the eviction policies and the accounting:

  produced = trained + dropped (by reason) + in_flight

where in_flight = unscored (incl. being scored) + scored + claimed by a learner, each counted
separately in Redis, so the equation is a real consistency check, not a definition.

Waiting requests (AcquirePrompts, ClaimRollouts, PullBatch with wait_ms) do not poll: the scripts
that make room, queue rollouts or add scored samples PUBLISH a wake-up (`<prefix>:wake:prompts`,
`<prefix>:wake:rollouts`, `<prefix>:wake:batch`),
one listener thread per store turns it into a condition variable, and a waiter re-runs its
script only when woken or every `poll_s` (a fallback for time-based events such as expired
leases, and for a wake-up missed while reconnecting). Idle replicas cost ~nothing.

Redis connection errors are retried with backoff for `retry_s`; past that the call raises
`CacheUnavailable`. When Redis comes back empty (restarted without persistence), the store
re-creates its run state, counts a reset, and treats rollouts answering tickets of the lost
state as produced-then-dropped (reason `lost`): their prompts are handed out again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import redis

from asyncopd.cache import scripts
from asyncopd.cache.policy import StalenessPolicy
from asyncopd.cache.rollback import Journal, JournalEntry, Mark, RedisRolledBack, RollbackGuard
from asyncopd.records import CursorState
from asyncopd.wire import payload, payload_store
from asyncopd.wire.errors import WireError
from asyncopd.wire.rpc import FailedPrecondition, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

EvictionPolicy = Literal["stalest-first", "lru", "fifo", "backpressure"]
BatchOrder = Literal["oldest-first", "newest-first"]
T = TypeVar("T")


class CacheUnavailable(RuntimeError):
    """Redis could not be reached within the retry window (maps to gRPC UNAVAILABLE)."""


class LearnerFenced(PermissionDenied):
    """A learner whose epoch is older than the newest `begin_learner` (maps to PERMISSION_DENIED)."""

    def __init__(self, epoch: int, current: int) -> None:
        super().__init__(
            f"learner epoch {epoch} is fenced: a learner of epoch {current} started since "
            "(only the newest learner may pull, ack and publish; this one must stop)"
        )


@dataclass(frozen=True)
class LearnerStart:
    """What `begin_learner` answers: the learner's fencing epoch, the published version, the
    version it starts at and how many prompt positions it re-opened from its checkpoint."""

    epoch: int
    published: int
    start_version: int
    cursor_restored: int


# Create the run state (KEYS[1] = run) if there is none; ARGV[2] = 1: a state that holds fresh
# admission (KEYS[2] = hold) until the learner begins or restores the cursor (re-created mid-run,
# or cache.hold_until_learner).
_CREATE_RUN = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  if ARGV[2] == '1' then redis.call('SET', KEYS[2], '1') end
  return 1
end
return 0
"""


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
    poll_s: float = 0.25  # fallback re-check of a waiting request (wake-ups come by pub/sub)
    payload_ttl_s: float = 600.0  # frames without accepted metadata expire after this long
    max_deliveries: int = 5  # teacher deliveries / batch claims of one sample before it is dropped as poison
    stale_tokens: str = "drop"  # StalenessPolicy.stale_tokens: drop a sample with tokens beyond the bound, or mask them
    max_tokens_in_flight: int = 0  # admission's token budget (all shards together; 0 = none)
    tokens_per_ticket: int = 0  # what each open ticket reserves of it (rollout.sampling.max_tokens)
    # A run state this process creates holds fresh admission until a learner begins or restores the
    # cursor (cache.hold_until_learner; the config's default is True, a bare policy's False). A state
    # re-created after this process saw another run always holds.
    hold_until_learner: bool = False


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
class PayloadRef:
    """Where a sample's frame is: its key, length and CRC-32 (`asyncopd.wire.payload`)."""

    key: str
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class StoredRollout:
    """A rollout as the store keeps it: what the store must know, and where its frame is.

    `frame` is set on the inline path only (the store writes it before the put script)."""

    sample_id: str
    ticket: str
    oldest_version: int
    num_tokens: int
    support_size: int  # 0 when the rollout carries no support
    payload: PayloadRef
    newest_version: int = 0
    frame: bytes | bytearray | None = None


@dataclass(frozen=True)
class StoredScores:
    """Teacher scores as the store keeps them (`frame` as in `StoredRollout`)."""

    sample_id: str
    payload: PayloadRef
    frame: bytes | bytearray | None = None
    # (tokens, support size) the teacher declared (metadata path): a put refuses scores whose
    # unscored rollout has another shape; None: checked already (inline scores are parsed by it)
    shape: tuple[int, int] | None = None


def shape_mismatch(sample_id: str, declared: tuple[int, int], stored: tuple[int, int]) -> WireError:
    return WireError(
        f"metas: scores of {sample_id!r} have {declared[0]} tokens x support {declared[1]}, but the rollout has "
        f"{stored[0]} x {stored[1]}"
    )


@dataclass(frozen=True)
class SampleMeta:
    """A stored sample's metadata: the rollout's, and the scores' once scored."""

    sample_id: str
    ticket: str
    oldest_version: int
    newest_version: int
    num_tokens: int
    support_size: int
    rollout: PayloadRef
    scores: PayloadRef | None = None


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
    """Rollouts handed to a teacher (metadata), and how many were re-deliveries."""

    samples: list[SampleMeta]
    redelivered: int
    stale_dropped: int = 0  # rollouts beyond the bound, dropped instead of handed out
    poisoned: int = 0  # rollouts whose lease ran out max_deliveries times, dropped as poison


def sum_claims(claims: Sequence[Claimed]) -> Claimed:
    """Several claim attempts' answer as one: their samples, their drops added up."""
    return Claimed(
        [m for c in claims for m in c.samples],
        sum(c.redelivered for c in claims),
        sum(c.stale_dropped for c in claims),
        sum(c.poisoned for c in claims),
    )


@dataclass(frozen=True)
class PulledBatch:
    batch_id: str
    version: int
    samples: list[SampleMeta]  # with scores
    staleness: list[int]


@dataclass(frozen=True)
class PullOutcome:
    batch: PulledBatch | None
    version: int
    returned: int  # samples of expired claims put back in the pool
    stale_dropped: int


def sum_pulls(pulls: Sequence[PullOutcome]) -> PullOutcome:
    """Several pull attempts' answer as one: the batch one of them claimed (at most one does),
    the newest version seen, what they put back and dropped added up."""
    batch = next((o.batch for o in pulls if o.batch is not None), None)
    return PullOutcome(
        batch, max(o.version for o in pulls), sum(o.returned for o in pulls), sum(o.stale_dropped for o in pulls)
    )


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


# Fields of a sample's hash that make its SampleMeta (see asyncopd.cache.scripts for the layout).
_META_FIELDS = ("ticket", "ov", "nv", "T", "K", "kr", "nr", "cr", "ks", "ns", "cs")
_PULLED_WIDTH = 2 + len(_META_FIELDS)  # pull.lua answers sid, ov and the meta fields per sample


def _pulled(res: Sequence[Any]) -> list[tuple[str, int, Sequence[Any]]]:
    """(sample id, oldest version, `_META_FIELDS` row) of each sample an 'OK' pull answer claimed."""
    return [(_s(res[i]), int(res[i + 1]), res[i + 2 : i + _PULLED_WIDTH]) for i in range(4, len(res), _PULLED_WIDTH)]


def _meta(sid: str, row: Sequence[Any]) -> SampleMeta | None:
    ticket, ov, nv, t, k, kr, nr, cr, ks, ns, cs = row
    if kr is None:
        return None
    scores = None if ks is None else PayloadRef(_s(ks), int(ns), int(cs))
    return SampleMeta(
        sid, _s(ticket or b""), int(ov), int(nv or ov), int(t), int(k), PayloadRef(_s(kr), int(nr), int(cr)), scores
    )


Gone = threading.Event | None  # set when the request's caller went away (cancelled, deadline passed)
CHANNELS = ("prompts", "rollouts", "batch")
# Channels whose waiting requests skip their first run when it would find nothing (`wait_any`).
# Not "batch": a pull also publishes the learner's version and extends its kept claims at once.
QUEUED_CHANNELS = ("prompts", "rollouts")


class WakeUps:
    """What waiting requests sleep on: one condition per wake-up channel, over one lock (the
    shards of one process share one `WakeUps`, so a request can wait on all of them). A wake-up
    of one channel rouses only that channel's waiters: a scored batch does not wake the
    replicas waiting for admission. `sleeping` counts the requests asleep now."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = {c: threading.Condition(self.lock) for c in CHANNELS}
        self.sleeping = 0

    def notify(self, channels: Iterable[str], *, relay: bool = False) -> None:
        """Rouse the waiters of `channels` (the caller holds `lock`). `relay`: only the one asleep
        longest on each, who passes the wake-up on if it found work (`wait_any`): new work wakes
        as many waiters as it has room for, plus one, not all of them."""
        for c in channels:
            if relay:
                self.cond[c].notify(1)
            else:
                self.cond[c].notify_all()


def wait_any(
    stores: Sequence[ExperienceStore], op: Callable[[], T | None], wait_ms: int, channel: str, gone: Gone = None
) -> T | None:
    """Run `op` until it returns non-None or `wait_ms` has passed (at least once); between
    runs, sleep until a wake-up on `channel` ("prompts", "rollouts" or "batch") of any of
    `stores` (which share one `WakeUps`: the shards of one process), or until `gone` is set.

    Wake-ups come from the scripts (pub/sub) and, for what only time changes (an expired
    prompt lease, teacher claim or batch claim), from each listener's one shared deadline
    check every `poll_s`: a waiter has no timer of its own while the listeners are subscribed,
    so an idle fleet of N waiters costs N script runs per call, not N per `poll_s`, and a long
    wait costs nothing while it sleeps. New work wakes one waiter (the one asleep longest), who
    relays the wake-up to the next when its run found some: as many waiters run `op` as the work
    has room for, plus one, instead of every waiter of the channel. A wait that ends without a
    wake-up returns None without running `op` again (nothing changed); so does one whose caller
    is `gone` (whatever `op` would take now would be handed to nobody). Without a live
    subscription (before the first, or while Redis is away) every waiter re-checks on its own
    every `poll_s`, as a wake-up may be missed then.

    On a `QUEUED_CHANNELS` channel a request that may wait does not run `op` first when a run of
    any request found nothing and no wake-up of the channel came since it began (every change
    that makes work publishes one): it would find nothing too, so it goes to sleep at once, in
    line behind the waiters before it, and runs `op` when a relayed wake-up reaches it or, once,
    when its wait ends (never when its caller is `gone`: it then returns None having run `op`
    zero times)."""
    wake = stores[0].wakeups
    if any(s.wakeups is not wake for s in stores):
        raise ValueError("wait_any: the stores must share one WakeUps")
    cond = wake.cond[channel]
    poll_s = min(s.policy.poll_s for s in stores)
    deadline = time.monotonic() + max(wait_ms, 0) / 1000.0
    woken = False  # this run of op follows a wake-up
    with wake.lock:
        skip = wait_ms > 0 and channel in QUEUED_CHANNELS and _found_nothing_since(stores, channel)
        # what the skip was judged on: a wake-up after it (before this request sleeps) wakes it
        seen = [s._woken[channel] for s in stores]
    ran = False  # op has run for this request
    while True:
        if skip:
            skip, result = False, None
        else:
            seen = [s._woken[channel] for s in stores]
            result, ran = op(), True
            if result is None:
                with wake.lock:
                    for s, v in zip(stores, seen, strict=True):
                        s._empty_at[channel] = max(s._empty_at[channel], v)
        if result is not None:
            if woken:  # a relayed wake-up found work: there may be more, the next waiter looks
                with wake.lock:
                    cond.notify(1)
            return result
        if time.monotonic() >= deadline:
            return result if ran else op()  # a wake-up that found nothing ends its relay here
        for s in stores:
            s._listen()
        woken = last_run = False
        with wake.lock:
            wake.sleeping += 1
            try:
                ended = False  # the wait ran out or the caller went away
                while [s._woken[channel] for s in stores] == seen:  # nothing happened since op ran
                    left = deadline - time.monotonic()
                    if left <= 0 or (gone is not None and gone.is_set()):
                        ended = True
                        break
                    if not all(s._subscribed for s in stores):
                        cond.wait(min(left, poll_s))
                        break  # no live subscription: re-check on the timer
                    woken = cond.wait(left)
                else:
                    woken = True
                if ended or (gone is not None and gone.is_set()):
                    if woken:
                        cond.notify(1)  # leaving with a relayed wake-up: hand it on
                    last_run = not ran and not (gone is not None and gone.is_set())
                    if not last_run:
                        return None
            finally:
                wake.sleeping -= 1
        if last_run:  # a request that skipped its first run runs once as its wait ends
            return op()


def _found_nothing_since(stores: Sequence[ExperienceStore], channel: str) -> bool:
    """Whether a run on `channel` found nothing and no wake-up of it came since that run began,
    on every store, with wake-ups live (the caller holds the stores' `WakeUps.lock`)."""
    return all(s._subscribed and s._woken[channel] == s._empty_at[channel] for s in stores)


class ExperienceStore:
    """The cache's state machine over one Redis key prefix (see `asyncopd.cache.scripts`)."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        policy: StorePolicy,
        on_redis_error: Callable[[str], None] | None = None,
        *,
        shard: int | None = None,
        shards: int = 1,
        wakeups: WakeUps | None = None,
    ) -> None:
        """`on_redis_error(reason)` is told of each failed Redis call ("connection" or "timeout").
        `wakeups`: what its waiters sleep on (shards of one process share one, so a request can
        wait on all of them at once: `wait_any`).

        With `shard` (one of `shards`, `asyncopd.cache.shards`) the store keeps its state in that
        shard's hash-tagged keyspace (`payload.shard_prefix`: one Redis Cluster slot), its tickets
        and batch ids start with `s<shard>.`, its dataset positions are those = shard mod `shards`,
        and it admits its share of the window (at least one batch)."""
        self.staleness = StalenessPolicy(policy.max_staleness, policy.batch_size, policy.stale_tokens)
        self.redis = client
        self.shard, self.shards = shard, shards
        tagged = key_prefix if shard is None else payload.shard_prefix(key_prefix, shard)
        self.prefix = tagged.rstrip(":") + ":"
        self._tag = "" if shard is None else f"s{shard}."
        self.window = max(policy.batch_size, self.staleness.window // shards)
        self.token_budget = policy.max_tokens_in_flight // shards  # this shard's share (0 = none)
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
        # The highest learner epoch this process has seen: a new learner's epoch is above it even
        # when Redis lost the epoch key, and it is restored with the version after such a loss.
        self._epoch_seen = 0
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self.wakeups = wakeups if wakeups is not None else WakeUps()
        self._woken = dict.fromkeys(CHANNELS, 0)  # wake-ups seen per channel
        # per channel, the wake-up count when the newest run that found nothing began (`wait_any`)
        self._empty_at = dict.fromkeys(CHANNELS, -1)
        self._listener: threading.Thread | None = None
        self._subscribed = False  # the listener holds a live subscription (waiters need no timer of their own)
        self._closed = threading.Event()
        # Rollbacks (a Redis back from a shorter append-only file): the write sequence seen, and
        # this process's batch claims and acks to apply again (asyncopd.cache.rollback).
        self._guard = RollbackGuard(self.key)
        self._journal = Journal(horizon_s=3600.0)
        self._guard_run: str | None = None
        # The thread applying the journal after a rollback (None: none is). Every other thread's
        # script waits until it is done: a request run on the rolled-back state before the repair
        # (an answer to a ticket the repair is about to close) would train a prompt twice.
        self._replay_owner: int | None = None
        self._replay_done = threading.Condition()
        # A new connection found Redis behind (or connects cannot be watched): look before a write.
        self._suspect = not self._watch_connects()
        self._look_each_time = self._suspect
        self.rollbacks = 0  # rollbacks this process detected (counted in Redis as cnt.rollbacks)
        self._retrying(self._ensure_state)
        self._retrying(self._after_reconnect)

    # -- plumbing -----------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.prefix + name

    def _ensure_state(self) -> None:
        """Create the run state if Redis has none (first start, or Redis lost everything). One
        re-created mid-run (this process saw another run) holds fresh admission until the
        learner hands its checkpoint's cursor state back (`restore_cursor`), in the same step, so
        no replica is handed position 0 of a run that trained it already. With
        `hold_until_learner` every state this process creates holds (until a learner begins): a
        process started after Redis lost everything cannot tell that from a new run."""
        new_run = self._tag + uuid.uuid4().hex[:12]
        hold = int(self._run_id is not None or self.policy.hold_until_learner)
        created = self.redis.eval(_CREATE_RUN, 2, self.key("run"), self.key("hold"), new_run, hold)
        run_id = _s(self.redis.get(self.key("run")))
        if created and self._run_id is not None:
            self.redis.hincrby(self.key("cnt"), "resets", 1)
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis lost the cache state (run %s -> %s); in-flight work is redone", self._run_id, run_id)
            if self._version_seen > 0 or self._epoch_seen > 0:
                self._scripts["publish"](keys=[self.prefix], args=[self._version_seen, 0, self._epoch_seen])
        self._run_id = run_id

    def _retrying(self, op: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.policy.retry_s
        delay = 0.05
        failed = False
        while True:
            try:
                if failed:
                    self._ensure_state()
                    self._after_reconnect()
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

    def _script(self, name: str, args: Sequence[Any]) -> Any:
        """Run Lua script `name`; when it finds the run state gone (Redis lost it), rebuild and rerun."""
        script = self._scripts[name]

        def run() -> Any:
            for _ in range(3):
                self._await_replay()
                if self._suspect and not self._replaying:
                    self._after_reconnect()
                res, seq, rollbacks, run, mark = self._guard.execute(self.redis, script, [self.prefix], list(args))
                if not (isinstance(res, list) and res and _s(res[0]) == "RESET"):
                    self._after_write(name, args, res, (seq, rollbacks, run), mark)
                    return res
                self._ensure_state()
                self._after_reconnect()
            raise CacheUnavailable("Redis keeps losing the cache state (is something flushing it?)")

        return self._retrying(run)

    def _watch_connects(self) -> bool:
        """Have every connection of the client's pool (open ones and future ones) look for a
        rollback right after it connects (`RollbackGuard.check_connection`); False when the
        client has no such pool (every write then looks first, one more round trip)."""
        pool = getattr(self.redis, "connection_pool", None)
        make = getattr(pool, "make_connection", None)
        if pool is None or make is None:
            return False

        def make_connection() -> Any:
            conn = make()
            conn.register_connect_callback(self._on_connect)
            return conn

        pool.make_connection = make_connection
        for conn in [*getattr(pool, "_available_connections", []), *getattr(pool, "_in_use_connections", [])]:
            conn.register_connect_callback(self._on_connect)
        return True

    def _on_connect(self, conn: Any) -> None:
        if self._guard_run is None or self._replaying or self._suspect:
            return  # not started, handling one, or already known: the next write looks first
        if self._guard.check_connection(conn, self._run_id) is not None:
            self._suspect = True
            raise RedisRolledBack("Redis is behind what this cache process saw (a rollback); handling it first")

    def _after_reconnect(self) -> None:
        """Before a write: a new run state starts the write sequence afresh; the same run state
        with a lower sequence than this process saw is a rollback, handled before the write."""
        self._suspect = self._look_each_time
        if self._run_id != self._guard_run:
            self._guard.start(self.redis)
            self._journal.clear()
            self._guard_run = self._run_id
            return
        found = self._guard.check(self.redis, self._run_id)
        if found is not None:
            self._recover_rollback(found)

    def _after_write(
        self, name: str, args: Sequence[Any], res: Any, state: tuple[int, int, str | None], mark: Mark
    ) -> None:
        """Journal batch claims and acks; handle a rollback the write revealed (`state`: the write
        sequence after the script, cnt.rollbacks and the run id, all from the same script run)."""
        if name == "pull" and isinstance(res, list) and _s(res[0]) == "OK":
            pulled = _pulled(res)
            sids = tuple(sid for sid, _, _ in pulled)
            ovs = tuple(ov for _, ov, _ in pulled)
            tickets = tuple(_s(row[0] or b"") for _, _, row in pulled)  # the first meta field
            bid, learner = _s(args[5]), _s(args[6])
            entry = JournalEntry("pull", time.monotonic(), bid, (), sids, tickets, ovs, int(res[1]), learner)
            self._journal.add(entry)
        elif name == "ack" and not isinstance(res, list) and int(res) >= 0:
            self._journal.add(JournalEntry("ack", time.monotonic(), _s(args[0]), tuple(args)))
        if not self._replaying:
            seq, rollbacks, run = state
            found = self._guard.observe(seq, rollbacks, mark, run=run)
            if found is not None:
                self._recover_rollback(found)

    @property
    def _replaying(self) -> bool:
        """Whether this thread is applying the journal (its own scripts run on)."""
        return self._replay_owner == threading.get_ident()

    def _await_replay(self) -> None:
        """Wait while another thread applies the journal after a rollback."""
        me = threading.get_ident()
        with self._replay_done:
            while self._replay_owner is not None and self._replay_owner != me:
                self._replay_done.wait()

    def _recover_rollback(self, found: str) -> None:
        """Redis went back in time (asyncopd.cache.rollback): count it once ('rollback'; a
        'replay' was counted by another process), re-publish the newest version seen, and apply
        this process's recent batch claims and acks again. One thread does it; another that
        found the same rollback meanwhile waits until it is done, and no other thread's script
        runs before (`_await_replay`)."""
        me = threading.get_ident()
        with self._replay_done:
            if self._replay_owner == me:
                return  # re-entered from the repair's own scripts
            if self._replay_owner is not None:
                while self._replay_owner is not None:
                    self._replay_done.wait()
                return  # handled by the thread that found it first
            self._replay_owner = me
        try:
            if found == "rollback":
                had, seen = self._guard.handled(self.redis)
                self.rollbacks += 1
                log.error(
                    "Redis rolled back: write sequence %d, this process had seen %d (an append-only file "
                    "that lost its tail, or a failover to a lagging replica); counted in cnt.rollbacks, "
                    "answers to lost tickets are dropped as 'lost', recent batch claims and acks re-applied",
                    had,
                    seen,
                )
            if self._version_seen > 0:
                self._script("publish", [self._version_seen, 0, self._epoch_seen])
            claim_ms = int(self.policy.batch_claim_s * 1000)
            reclaimed = recreated = missing = acks = 0
            for entry in self._journal.recent():
                if entry.kind == "pull":
                    samples = zip(entry.sample_ids, entry.tickets, entry.oldest, strict=True)
                    args = [self._now_ms(), claim_ms, entry.batch_id, entry.version, entry.learner]
                    got = self._script("reclaim", [*args, *(x for triple in samples for x in triple)])
                    reclaimed, recreated = reclaimed + int(got[0]), recreated + int(got[1])
                    missing += int(got[2])
                else:
                    self._script("ack", list(entry.args))  # idempotent: a kept ack answers its count
                    acks += 1
            log.warning(
                "after the rollback: %d samples claimed again, %d re-created (their put was lost too), %d claimed "
                "elsewhere or already answered, %d recent acks re-run",
                reclaimed,
                recreated,
                missing,
                acks,
            )
        finally:
            with self._replay_done:
                self._replay_owner = None
                self._replay_done.notify_all()

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

    def _wait(self, op: Callable[[], T | None], wait_ms: int, channel: str, gone: Gone = None) -> T | None:
        return wait_any([self], op, wait_ms, channel, gone)  # op retries Redis errors itself

    def wake_waiters(self) -> None:
        """Wake every waiting request of this store (and of the shards sharing its `WakeUps`) to
        look at its `gone` flag: a caller that went away ends its wait at once."""
        with self.wakeups.lock:
            self.wakeups.notify(CHANNELS)

    def _listen(self) -> None:
        """Start the wake-up listener (once, on the first wait)."""
        with self.wakeups.lock:
            if self._listener is None and not self._closed.is_set():
                self._listener = threading.Thread(target=self._listen_loop, name="cache-wake", daemon=True)
                self._listener.start()

    def _bump(self, channels: Iterable[str], *, relay: bool = True) -> None:
        """Count a wake-up on `channels` and rouse their waiters: by default one, who relays it
        (new work: `wait_any`); `relay=False` rouses all (a wake-up may have been missed)."""
        channels = list(channels)
        if not channels:
            return  # nothing happened: no waiter needs to wake (the deadline check finds none most times)
        with self.wakeups.lock:
            for c in channels:
                self._woken[c] += 1
            self.wakeups.notify(channels, relay=relay)

    def _listen_loop(self) -> None:
        channels = {self.key(f"wake:{c}").encode(): c for c in self._woken}
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*channels)
                with self.wakeups.lock:
                    self._subscribed = True
                # a wake-up published while there was no subscription is lost: every waiter re-checks once
                self._bump(self._woken, relay=False)
                check_at = time.monotonic() + self.policy.poll_s
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=max(0.0, min(0.2, check_at - time.monotonic())))
                    if msg is not None and msg.get("channel") in channels:
                        self._bump([channels[msg["channel"]]])
                    if time.monotonic() >= check_at:
                        self._bump(self._deadlines_passed())
                        check_at = time.monotonic() + self.policy.poll_s
            except redis.RedisError as exc:  # waiters fall back to poll_s until it is back
                if not self._closed.is_set():
                    log.debug("wake-up listener: %s; resubscribing", exc)
                    self._closed.wait(0.5)
            finally:
                with self.wakeups.lock:
                    self._subscribed = False
                    self.wakeups.notify(CHANNELS)  # waiters without a timer take theirs up again
                pubsub.close()

    # the time-ordered sets whose members come due with time alone, and the channel each wakes
    _DUE = (("tlease", "prompts"), ("tclaim", "rollouts"), ("bclaim", "batch"))

    def _deadlines_passed(self) -> list[str]:
        """The channels with a lease or claim past its deadline (one round trip for all three):
        their waiters re-run their scripts, which hand the expired work out again."""
        now = self._now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for key, _ in self._DUE:
            pipe.zrangebyscore(self.key(key), "-inf", now, start=0, num=1)
        return [channel for (_, channel), due in zip(self._DUE, pipe.execute(), strict=True) if due]

    def close(self) -> None:
        """Stop the wake-up listener and close the Redis client."""
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=1.0)
        self.redis.close()

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _position(self, local: int) -> int:
        """The dataset position of this shard's cursor position `local` (shards interleave)."""
        return local if self.shard is None else local * self.shards + self.shard

    # -- learner version ----------------------------------------------------------------------

    def known_version(self) -> int:
        """The newest learner version this process has seen, without asking Redis: at most the
        published one (`version()`), as versions only go up."""
        return max(self._version_seen, self._version_hint)

    def version(self) -> int:
        """The published learner version (never below one this process saw: versions only go up)."""
        current = self._retrying(lambda: int(self.redis.get(self.key("ver")) or 0))
        self._version_hint = current
        self._version_seen = max(self._version_seen, current)
        return self._version_seen

    def _fence(self, epoch: int, res: Any) -> None:
        """Raise `LearnerFenced` when a script refused `epoch`; note the epoch otherwise."""
        if isinstance(res, list) and res and _s(res[0]) == "FENCED":
            raise LearnerFenced(epoch, int(res[1]))
        self._epoch_seen = max(self._epoch_seen, epoch)

    def begin_learner(self, has_checkpoint: bool, checkpoint_version: int, saved: CursorState | None) -> LearnerStart:
        """A learner starts: a new fencing epoch (every older learner is refused from now on, and
        its batch claims expire at once), the version it starts at (`StalenessPolicy.start_version`)
        and, when Redis's prompt cursor is behind the checkpoint's (Redis lost its state), the
        checkpoint's cursor state restored."""
        res = self._script("begin", [self._epoch_seen])
        epoch, published = int(res[0]), int(res[1])
        self._epoch_seen = max(self._epoch_seen, epoch)
        self._version_seen = max(self._version_seen, published)
        published = self._version_seen
        start = self.staleness.start_version(published, checkpoint_version if has_checkpoint else None, epoch > 1)
        restored = self.restore_cursor(epoch, saved)  # also releases a re-created state's hold
        return LearnerStart(epoch, published, start, restored)

    def restore_cursor(self, epoch: int, saved: CursorState | None, trained_tickets: Sequence[str] = ()) -> int:
        """Move the prompt cursor up to `saved` (and past the positions of `trained_tickets`: the
        learner's batches trained since `saved`, unsaved yet) and re-open its open positions and
        those admitted after it but not trained, when Redis's cursor is behind because it lost its
        state (a run state other than the one `saved` was read from); release the hold a re-created
        state puts on fresh admission. -> positions re-opened (0 when it was not behind, or holds
        the same run: a rollback, which `_recover_rollback` repairs, not this)."""
        state = saved or CursorState(0)
        run = state.runs[0] if len(state.runs) == 1 else ""
        trained = self._ticket_positions(trained_tickets)
        args = [epoch, state.cursor, run, int(saved is not None), len(state.open), *state.open, *trained]
        res = self._script("restore_cursor", args)
        self._fence(epoch, res)
        n = int(res[1])
        if n:
            log.warning("prompt cursor restored to %d from a checkpoint; %d positions re-opened", state.cursor, n)
        return n

    def _ticket_positions(self, tickets: Sequence[str]) -> list[int]:
        """This shard's cursor positions of `tickets` of earlier run states (`<tag><run>-<pos>`);
        tickets of the current run are live here and left out."""
        out = []
        for ticket in tickets:
            head, sep, pos = ticket.rpartition("-")
            if sep and pos.isdigit() and head.startswith(self._tag) and head != self._run_id:
                out.append(int(pos))
        return out

    def run_state(self) -> tuple[tuple[str, ...], bool]:
        """((the run id Redis holds,), whether fresh admission is held for a cursor restore): the
        shape `ShardedStore.run_state` has, one run id per shard."""

        def read() -> tuple[tuple[str, ...], bool]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.key("run"))
            pipe.exists(self.key("hold"))
            run, held = pipe.execute()
            if run is None or _s(run) != self._run_id:
                # Redis lost the state and no script of this process has run since: re-create it
                # (holding fresh admission) before answering, or a learner would hand its cursor
                # back to a process that still takes the lost run's tickets for live ones
                self._ensure_state()
                return read()
            return (_s(run),), bool(held)

        return self._retrying(read)

    def cursor_state(
        self,
        epoch: int,
        trained_batches: Sequence[str],
        saved: CursorState | None = None,
        trained_tickets: Sequence[str] = (),
    ) -> CursorState:
        """The prompt cursor state a checkpoint records: the cursor, and the positions below it
        still open (tickets out or waiting for re-issue, samples stored), except those of
        `trained_batches` (the checkpoint saves them; `trained_tickets` are their samples'
        tickets). `saved` (the previous checkpoint's) is restored first when Redis lost its state
        since (`restore_cursor`).

        Read in two steps: tickets with the cursor in one transaction, then the samples; a ticket
        answered in between is seen as a ticket, so no open position is missed. Only the learner
        of `epoch` acks, and it does not while it checkpoints.

        Redis may lose its state between the restore and the read (or within the read): a state
        read then is a new run's, cursor 0, still holding fresh admission. Handed back later as
        `saved`, it would release that hold at position 0 and the run would train every prompt
        again (2,848 positions in a CI chaos run). So the read is taken only when the run it reads
        is the one the restore saw through, with no hold and the same run at its end; otherwise
        the restore is made again (from the same `saved`) and the state read again."""
        for _ in range(5):
            self.restore_cursor(epoch, saved, trained_tickets)
            state = self._retrying(lambda: self._read_cursor_state(trained_batches))
            if state is not None:
                return state
            log.warning("Redis lost its state while the prompt cursor was read; restoring it and reading again")
        raise CacheUnavailable("Redis kept losing its state while the prompt cursor was read; retry")

    def _read_cursor_state(self, trained_batches: Sequence[str]) -> CursorState | None:
        """`cursor_state`'s read; None when the run state is gone, changed during the read or
        holds fresh admission (Redis lost its state after the restore)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.key("run"))
        pipe.exists(self.key("hold"))
        pipe.get(self.key("cursor"))
        pipe.zrange(self.key("tlease"), 0, -1)
        pipe.lrange(self.key("reissue"), 0, -1)
        for bid in trained_batches:
            pipe.lrange(self.key(f"b:{bid}:ids"), 0, -1)
        run, held, cursor, leased, reissue, *batches = pipe.execute()
        if run is None or held:
            return None
        tickets = [_s(t) for t in [*leased, *reissue]]
        trained = {_s(sid) for ids in batches for sid in ids}
        sids = [
            key[len(self.prefix) + 2 :]
            for key in (_s(k) for k in self.redis.scan_iter(match=self.key("s:*"), count=1000))
        ]
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self.key(f"s:{sid}"), "ticket")
        pipe.get(self.key("run"))
        *answered, run_after = pipe.execute()
        if run_after != run:
            return None
        tickets += [_s(t) for sid, t in zip(sids, answered, strict=True) if t and sid not in trained]
        head = _s(run) + "-"
        positions = {int(t[len(head) :]) for t in tickets if t.startswith(head) and t[len(head) :].isdigit()}
        return CursorState(int(cursor or 0), tuple(sorted(positions)), (_s(run),))

    def publish_version(self, version: int, finished: bool = False, *, epoch: int = 0) -> int:
        if version < 0:
            raise ValueError(f"version: {version} is negative")
        res = self._script("publish", [version, int(finished), epoch])
        self._fence(epoch, res)
        if _s(res[0]) == "BEHIND":
            raise FailedPrecondition(f"version {version} is behind the published version {int(res[1])}")
        self._version_seen = max(self._version_seen, int(res[1]))
        self._version_hint = int(res[1])
        return int(res[1])

    # -- prompts ------------------------------------------------------------------------------

    def acquire(self, replica: str, max_prompts: int, wait_ms: int = 0, gone: Gone = None) -> Admitted:
        """Admission tickets for up to `max_prompts` dataset positions (re-issues first), waiting
        up to `wait_ms` for any (or for the run to finish) unless the caller is `gone`."""
        tries: list[Admitted] = []

        def once() -> Admitted | None:
            tries.append(self.acquire_once(replica, max_prompts))
            return tries[-1] if tries[-1].tickets or tries[-1].finished else None

        self._wait(once, wait_ms, "prompts", gone)
        if not tries:  # its caller went away before it ran (`wait_any`)
            return Admitted([], self.known_version(), False, 0)
        return self.admission_outcome(tries[-1], max_prompts)

    def acquire_once(self, replica: str, max_prompts: int) -> Admitted:
        """One admission attempt (its tickets may be none; its version is the published one)."""
        lease_ms = int(self.policy.prompt_lease_s * 1000)

        def once() -> Admitted:
            args = [self._now_ms(), replica, max_prompts, self.window, lease_ms]
            args += [self.token_budget, self.policy.tokens_per_ticket]
            res = self._script("acquire", args)
            tickets = [Admission(_s(res[i]), self._position(int(res[i + 1]))) for i in range(3, len(res), 2)]
            return Admitted(tickets, int(res[0]), bool(int(res[1])), int(res[2]))

        return self._retrying(once)

    def admission_outcome(self, got: Admitted, max_prompts: int) -> Admitted:
        """What an admission request answers (its last attempt), counted once per request (not
        per attempt) when it came up short: how often producers find admission full."""
        if len(got.tickets) < max_prompts and not got.finished:
            self._retrying(lambda: self.redis.hincrby(self.key("cnt"), "admission_blocked", 1))
        return got

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
            ref = r.payload
            items += [r.sample_id, r.ticket, r.oldest_version, r.num_tokens, r.support_size]
            items += [ref.key, ref.nbytes, ref.checksum, r.newest_version]
            items.append(self.staleness.judged_version(r.oldest_version, r.newest_version))
        inline = [(r.payload.key, r.frame) for r in rollouts if r.frame is not None]
        self.write_frames(inline)

        def args(version: int) -> list[Any]:
            bound = self.staleness.oldest_usable(version)
            return [self._now_ms(), version, bound, p.byte_budget, p.eviction, len(rollouts), *items]

        try:
            res = self._at_version("put_rollouts", args)
        except BaseException:
            self._forget(inline)
            raise
        tag = _s(res[0])
        if tag != "OK":
            self._forget(inline)
        if tag == "UNKNOWN":
            raise WireError(
                f"rollouts[{int(res[1])}].ticket: unknown ticket {_s(res[2])!r} "
                "(not issued by this cache; answer tickets from AcquirePrompts)"
            )
        if tag == "FULL":
            raise self._full(res)
        return PutOutcome(*(int(x) for x in res[1:8]))

    def write_frames(self, frames: Sequence[tuple[str, bytes | bytearray]]) -> None:
        """SET inline frames (key, bytes) with the orphan TTL (the put script persists them)."""
        if not frames:
            return
        ttl_ms = int(self.policy.payload_ttl_s * 1000)

        def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for key, frame in frames:
                pipe.set(key, frame, px=ttl_ms)
            pipe.execute()

        self._retrying(write)

    def read_frames(self, keys: Sequence[str]) -> list[bytes | None]:
        """Frames by key (None where gone), for the inline path."""
        if not keys:
            return []
        frames: list[Any] = self._retrying(lambda: payload_store.mget(self.redis, keys))
        return frames

    def _forget(self, frames: Sequence[tuple[str, bytes | bytearray]]) -> None:
        """Remove inline frames of a refused put (they would expire anyway)."""
        if frames:
            try:
                self.redis.delete(*(key for key, _ in frames))
            except redis.RedisError:
                log.warning("could not remove %d frames of a refused put; they expire by TTL", len(frames))

    def claim_rollouts(self, teacher: str, max_rollouts: int, wait_ms: int = 0, gone: Gone = None) -> Claimed:
        """Unscored rollouts for `teacher`, oldest first (expired leases of other teachers go back
        to the queue first; those delivered `max_deliveries` times are dropped as poison),
        waiting up to `wait_ms` for any unless the caller is `gone`."""
        tries: list[Claimed] = []

        def once() -> Claimed | None:
            tries.append(self.claim_once(teacher, max_rollouts))
            return tries[-1] if tries[-1].samples else None

        self._wait(once, wait_ms, "rollouts", gone)
        return sum_claims(tries)

    def claim_once(self, teacher: str, max_rollouts: int) -> Claimed:
        """One claim attempt (its samples may be none; its drops count all the same)."""
        p = self.policy

        def args(version: int) -> list[Any]:
            bound = self.staleness.oldest_usable(version)
            return [
                self._now_ms(),
                teacher,
                max_rollouts,
                int(p.teacher_lease_s * 1000),
                p.max_deliveries,
                version,
                bound,
            ]

        def once() -> Claimed:
            res = self._at_version("claim", args)
            width = 1 + len(_META_FIELDS)
            metas = [_meta(_s(res[i]), res[i + 1 : i + width]) for i in range(5, len(res), width)]
            return Claimed([m for m in metas if m is not None], int(res[1]), int(res[2]), int(res[3]))

        return self._retrying(once)

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

    def put_scores(self, scores: Sequence[StoredScores]) -> PutOutcome:
        """Attach teacher scores by reference; unknown or already scored ones are late (their
        frames are deleted), ones whose frame is missing are ignored (the rollout is re-delivered)."""
        p = self.policy
        items: list[Any] = []
        for sc in scores:
            tokens, support = sc.shape if sc.shape is not None else (-1, -1)
            items += [sc.sample_id, sc.payload.key, sc.payload.nbytes, sc.payload.checksum, tokens, support]
        inline = [(sc.payload.key, sc.frame) for sc in scores if sc.frame is not None]
        self.write_frames(inline)

        def args(version: int) -> list[Any]:
            bound = self.staleness.oldest_usable(version)
            return [self._now_ms(), version, bound, p.byte_budget, p.eviction, len(scores), *items]

        try:
            res = self._at_version("put_scores", args)
        except BaseException:
            self._forget(inline)
            raise
        if _s(res[0]) == "FULL":
            self._forget(inline)
            raise self._full(res)
        if _s(res[0]) == "SHAPE":
            self._forget(inline)
            sc = scores[int(res[1]) - 1]
            assert sc.shape is not None
            raise shape_mismatch(sc.sample_id, sc.shape, (int(res[2]), int(res[3])))
        acc, late, stale, ev_n, ev_bytes, ev_stale = (int(x) for x in res[1:7])
        return PutOutcome(acc, late, stale=stale, evicted=ev_n, evicted_bytes=ev_bytes, evicted_stale=ev_stale)

    def refuse_unscored(self, refused: dict[str, str]) -> int:
        """Drop unscored samples whose rollout frame a teacher refused (sid -> reason)."""
        if not refused:
            return 0
        args = [x for sid, reason in refused.items() for x in (sid, reason)]
        return int(self._script("refuse_unscored", args))

    # -- batches ------------------------------------------------------------------------------

    def pull_batch(
        self,
        size: int,
        learner_version: int,
        learner: str,
        wait_ms: int = 0,
        *,
        epoch: int = 0,
        keep: Sequence[str] = (),
        gone: Gone = None,
    ) -> PullOutcome:
        """Claim exactly `size` scored samples no staler than the bound, or none, waiting up to
        `wait_ms` for them unless the caller is `gone`. The claims of
        `keep` (batches the learner trained and acks after its next checkpoint) are extended and
        their admission slots freed first; a learner `epoch` older than the newest is refused.
        `size` 0 with `keep` only extends those claims (a learner waiting out a failed checkpoint):
        nothing is claimed and the version is not touched."""
        tries: list[PullOutcome] = []

        def once() -> PullOutcome | None:
            tries.append(self.pull_once(size, learner_version, learner, epoch=epoch, keep=keep))
            return tries[-1] if tries[-1].batch is not None else None

        self._wait(once, wait_ms, "batch", gone)
        return sum_pulls(tries)

    def pull_once(
        self, size: int, learner_version: int, learner: str, *, epoch: int = 0, keep: Sequence[str] = ()
    ) -> PullOutcome:
        """One pull attempt (its batch may be None; what it dropped as stale counts all the same)."""
        p = self.policy
        # The batch is served at learner_version (an older one is refused as BEHIND), so the
        # bound is exact here without a version check.
        oldest_usable = self.staleness.oldest_usable(learner_version)

        def once() -> PullOutcome:
            bid = self._tag + uuid.uuid4().hex
            args = [self._now_ms(), learner_version, oldest_usable, size, p.order, bid, learner]
            res = self._script("pull", [*args, int(p.batch_claim_s * 1000), p.max_deliveries, epoch, *keep])
            self._fence(epoch, res)
            tag = _s(res[0])
            if tag == "BEHIND":
                raise FailedPrecondition(
                    f"learner_version {learner_version} is behind the published version {int(res[1])}"
                )
            self._version_hint = version = int(res[1])
            returned, stale = int(res[2]), int(res[3])
            if tag in ("WAIT", "KEPT"):
                return PullOutcome(None, version, returned, stale)
            metas = [(_meta(sid, row), ov) for sid, ov, row in _pulled(res)]
            # claimed samples stay until acked (only ack and claim expiry touch them)
            kept = [(m, version - ov) for m, ov in metas if m is not None]
            batch = PulledBatch(bid, version, [m for m, _ in kept], [st for _, st in kept])
            return PullOutcome(batch, version, returned, stale)

        return self._retrying(once)

    def note_refused(self, batch_id: str, refused: dict[str, str]) -> None:
        """Frames of a claimed batch the cache could not read (inline path): its ack drops them."""
        if refused:
            mapping: dict[Any, Any] = dict(refused)
            self._retrying(lambda: self.redis.hset(self.key(f"b:{batch_id}:refused"), mapping=mapping))

    def ack_batch(self, batch_id: str, refused: dict[str, str] | None = None, *, epoch: int = 0) -> int:
        """Count the batch trained, except `refused` samples (sid -> reason): dropped with that reason."""
        extra = [x for sid, reason in (refused or {}).items() for x in (sid, reason)]
        res = self._script("ack", [batch_id, epoch, *extra])
        self._fence(epoch, res)
        n = int(res)
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
            pipe.zcard(self.key("tclaim"))
            pipe.get(self.key("fin"))
            pipe.get(self.key("run"))
            ver, cnt_raw, drop, evict, served, n_scored, n_leased, n_reissue, scoring, fin, run = pipe.execute()
            if run is None or _s(run) != self._run_id:  # Redis lost the state: rebuild it, then report
                self._ensure_state()
                return read()
            cnt = _int_map(cnt_raw)
            unscored, claimed = cnt.get("unscored", 0), cnt.get("claimed", 0)
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
                    "scoring": int(scoring),
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
