"""Rollback detection: a Redis that came back with fewer writes than this process saw.

A Redis restarted from an append-only file that lost its tail (`appendfsync everysec` loses up
to a second on a crash; a cut or corrupt file; a failover to an asynchronous replica) keeps its
run id, so the lost-state check (`EXISTS run`) does not see it, yet it has forgotten writes the
services were told had happened: a lost ack puts a trained batch back under claim (its samples
would be trained again when the claim expires); a lost batch claim puts samples the learner is
training back in the pool; a lost admission moves the prompt cursor back.

Detection: every script the store runs ends with `INCR <prefix>wseq` (the write sequence) and
a read of the rollback counter, in the same atomic step, so this process knows the sequence number
of its newest write. INCR only goes up, in every process; an answer at or below the highest
one seen means Redis went back in time. A Redis that went back restarted, so every connection
to it is new: redis-py replaces a dead one without an error, inside the request that finds it
dead, so each new connection reads the sequence first (`check_connection`, a connect callback
the store installs) and, behind, fails that request (`RedisRolledBack`) before it runs: the
first request on the rolled-back state (a batch claim taking the samples a lost claim had
handed out) never runs before the rollback is handled. No round trip is added to a request on
an open connection.

Handling (the store's `_recover_rollback`): count it (`cnt.rollbacks`, and `cnt.resets`, so
answers to tickets the rollback lost are dropped as `lost` like after a wipe, and their prompts
come round again), push `wseq` back above the highest value seen (other processes then see the
counter move instead of a second rollback), re-publish the newest version seen, and apply again
this process's batch claims and acks of the last hour (`Journal`): a claim Redis lost is
re-created over the same samples (`reclaim.lua`; a sample Redis lost altogether, put and all, is
re-created as claimed and its prompt counted answered, re-admitting the positions a lost
admission skipped), an ack it lost is re-run (acks are idempotent). So no batch the learner was
handed goes back to the pool behind its back, none it acked is handed out again, and no prompt
it trained is admitted again. What stays open: writes of a cache process that died in the same
crash are not replayed (no process remembers them).

It knows Redis commands and the store's script names; it knows nothing of gRPC.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

SEQ_KEY = "wseq"  # the write sequence: INCR after every script


def _str(value: Any) -> str | None:
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    if value is None:
        return 0
    return int(value.decode() if isinstance(value, bytes) else value)


@dataclass(frozen=True)
class JournalEntry:
    """A write this process may have to apply again: a batch claim or an ack."""

    kind: str  # "pull" (a batch claim) or "ack"
    at: float  # time.monotonic() when it was made
    batch_id: str
    args: tuple[Any, ...] = ()  # ack: the script's arguments, as sent
    sample_ids: tuple[str, ...] = ()  # pull: the samples claimed
    tickets: tuple[str, ...] = ()  # pull: the admission ticket each answered
    oldest: tuple[int, ...] = ()  # pull: each sample's oldest token version
    version: int = 0  # pull: the version the batch was served at
    learner: str = ""


class Journal:
    """This process's batch claims and acks of the last `horizon_s` (a batch claim period).

    Older entries cannot matter: a claim older than its period has expired (or was acked), and
    an ack's batch is kept acked for an hour."""

    def __init__(self, horizon_s: float, max_entries: int = 4096) -> None:
        self.horizon_s = horizon_s
        self._entries: deque[JournalEntry] = deque(maxlen=max_entries)
        self._lock = threading.Lock()

    def add(self, entry: JournalEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def recent(self) -> list[JournalEntry]:
        cutoff = time.monotonic() - self.horizon_s
        with self._lock:
            while self._entries and self._entries[0].at < cutoff:
                self._entries.popleft()
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class RedisRolledBack(redis.ConnectionError):
    """A connection that just (re)connected found Redis behind this process: the request that
    opened it is failed before it runs, and retried once the rollback is handled."""


@dataclass(frozen=True)
class Mark:
    """What this process knew just before it sent a request (taken before sending, so nothing
    a concurrent request learns later can make a healthy reply look old)."""

    seen: int  # highest write sequence seen
    rollbacks: int  # cnt.rollbacks as last seen
    handled: int  # rollbacks this process handled (and run states it started on) so far


class RollbackGuard:
    """Tracks the write sequence this process has seen and decides when Redis went back.

    Requests run concurrently (the cache's gRPC threads), so replies are not compared with each
    other but each with the `Mark` taken before it was sent: in a healthy Redis an INCR answers
    above every sequence any reply had carried by then, a GET at least as high, and the rollback
    count never goes down. A reply to a request sent before a rollback was handled is not
    counted again (it was caught on the same rollback)."""

    def __init__(self, key: Callable[[str], str]) -> None:
        self._key = key
        self._seen = 0  # highest write sequence this process saw
        self._rollbacks_seen = 0  # cnt.rollbacks as of this process's last look or handling
        self._handled = 0
        self._run: str | None = None  # the run state (run id) the sequence belongs to
        self._lock = threading.Lock()

    def mark(self) -> Mark:
        with self._lock:
            return Mark(self._seen, self._rollbacks_seen, self._handled)

    def execute(
        self, client: redis.Redis, script: Any, keys: Sequence[Any], args: Sequence[Any]
    ) -> tuple[Any, int, int, str | None, Mark]:
        """Run a registered script (redis-py `Script`) of `asyncopd.cache.scripts`, which bumps the
        write sequence and reads the rollback count and run id itself after its body (one
        EVALSHA, atomic: no transaction around it).

        -> (script result, write sequence after it, cnt.rollbacks, run id, the mark before sending)."""
        for attempt in range(2):
            mark = self.mark()
            try:
                reply = client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                script.sha = client.script_load(script.script)  # Redis restarted: scripts are gone
                continue
            if len(reply) == 1:  # {'RESET'}: the run state is gone, nothing ran (the store rebuilds it)
                return reply, 0, 0, None, mark
            res, seq, rollbacks, run = reply
            return res, int(seq), _int(rollbacks), _str(run), mark
        raise AssertionError("unreachable")

    def start(self, client: redis.Redis) -> None:
        """Begin at Redis's current sequence (a fresh process, or the run state was re-created)."""
        pipe = client.pipeline(transaction=True)
        pipe.get(self._key(SEQ_KEY))
        pipe.hget(self._key("cnt"), "rollbacks")
        pipe.get(self._key("run"))
        seq, rollbacks, run = pipe.execute()
        with self._lock:
            self._seen, self._rollbacks_seen, self._run = _int(seq), _int(rollbacks), _str(run)
            self._handled += 1  # requests sent before are judged against the old state: ignore them

    def check(self, client: redis.Redis, run_id: str | None) -> str | None:
        """Look before writing: what `observe` would say, without a write. None when the run
        state is not `run_id`'s (gone or re-created: the lost-state path handles that)."""
        mark = self.mark()
        pipe = client.pipeline(transaction=False)
        pipe.get(self._key("run"))
        pipe.get(self._key(SEQ_KEY))
        pipe.hget(self._key("cnt"), "rollbacks")
        run, seq, rollbacks = pipe.execute()
        return self._judge(run, seq, rollbacks, mark, run_id)

    def check_connection(self, conn: Any, run_id: str | None) -> str | None:
        """`check` on one redis-py connection that has just connected (before it carries anything)."""
        mark = self.mark()
        replies = []
        commands = (("GET", self._key("run")), ("GET", self._key(SEQ_KEY)), ("HGET", self._key("cnt"), "rollbacks"))
        for command in commands:
            conn.send_command(*command)
            replies.append(conn.read_response())
        run, seq, rollbacks = replies
        return self._judge(run, seq, rollbacks, mark, run_id)

    def _judge(self, run: Any, seq: Any, rollbacks: Any, mark: Mark, run_id: str | None) -> str | None:
        if _str(run) is None or _str(run) != run_id:
            return None
        return self.observe(_int(seq), _int(rollbacks), mark, after_write=False, run=_str(run))

    def observe(
        self, seq: int, rollbacks: int, mark: Mark, *, after_write: bool = True, run: str | None = None
    ) -> str | None:
        """'rollback' when Redis is behind what this process knew when it sent the request (and
        no rollback was handled since), 'replay' when another process counted a rollback (this
        one's journal must be applied again too), else None.

        Behind: a write's INCR at or below the mark's sequence, a read's sequence below it, or a
        rollback count below the mark's (the count itself went back)."""
        with self._lock:
            if run != self._run:
                return None  # another run state (Redis came back empty): the lost-state path rebases
            if mark.handled < self._handled:
                return None  # sent before the last handling: caught on that same rollback
            if rollbacks > self._rollbacks_seen:
                self._rollbacks_seen = rollbacks
                self._seen = max(self._seen, seq)
                return "replay"
            behind = seq <= mark.seen if after_write else seq < mark.seen
            if behind or rollbacks < mark.rollbacks:
                return "rollback"
            self._seen = max(self._seen, seq)
            return None

    def handled(self, client: redis.Redis) -> tuple[int, int]:
        """Count a rollback in Redis and move the sequence back above the highest seen.

        -> (the sequence Redis had, the highest this process had seen)."""
        with self._lock:
            seen = self._seen
            had = _int(client.get(self._key(SEQ_KEY)))
            pipe = client.pipeline(transaction=True)
            pipe.hincrby(self._key("cnt"), "rollbacks", 1)
            pipe.hincrby(self._key("cnt"), "resets", 1)
            pipe.set(self._key(SEQ_KEY), max(had, seen) + 1)
            rollbacks, _, _ = pipe.execute()
            self._seen = max(had, seen) + 1
            self._rollbacks_seen = int(rollbacks)
            self._handled += 1
        return had, seen
