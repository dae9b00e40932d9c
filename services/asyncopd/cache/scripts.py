"""The cache's Lua scripts: every read-check-write on shared state runs as one atomic script.

Several cache-service processes may share one Redis, and any of them may die between two
commands, so each operation that reads state and then changes it (admission, puts with
eviction, batch claims, acks) is a single script: Redis runs it atomically, and a script
checks everything before it writes anything, so a refused request leaves no trace.

The Lua source lives in `asyncopd/cache/lua/*.lua` (package data, so a wheel carries it); each
script is `common.lua` (shared helpers and the lost-state check) followed by its own file. The
scripts apply the staleness rules but do not derive them: the admission window and the oldest
usable version are computed by `asyncopd.cache.policy` and passed in as arguments. A script
whose bound depends on the learner version takes the version it was computed for and answers
{'VERSION', current} when the learner published since; the store recomputes and reruns.

KEYS[1] is the run's key prefix (ending in ':'); every key a script touches hangs off it. That
is fine on a standalone Redis or a replicated primary, not on Redis Cluster (keys are not
declared one by one). The key layout:

  run            run id (random; recreated when Redis lost everything)  ver  learner version
  fin            1 once the learner finished                             cursor  next dataset position
  cnt            hash of counters (produced, trained, slots, bytes, unscored, claimed, ...)
  drop           hash reason -> dropped samples       evict  hash policy -> evictions
  served         hash staleness -> samples served     pulled hash version -> samples pulled at it
  t:<ticket>     hash pos, replica, ver of an open admission ticket
  tlease         zset ticket -> lease deadline (ms)   reissue  list of tickets to hand out again
  (tickets are "<run id>-<cursor position>": a ticket of this run below the cursor without an
   open t:<ticket> hash was answered already, so closed tickets need no storage)
  s:<sid>        hash of a sample's metadata: st (unscored/scored/claimed), ov/nv oldest/newest token
                 version, T, K, seq, ticket, xid (queue entry), nb (bytes counted against the budget),
                 kr/nr/cr rollout frame key/bytes/CRC-32, ks/ns/cs the same for the scores frame
  pr:<sid>:<nonce>, ps:<sid>:<nonce>
                 payload frames (asyncopd.wire.payload) written by the rollout replica / teacher
                 with a TTL; a put checks STRLEN = declared bytes and PERSISTs them, every script
                 that removes a sample DELs them with its hash; never passed as script arguments
  q              stream of unscored sample ids; consumer group `teachers`
  scored         zset sid -> ov * 2^32 + seq  (scored, unclaimed; oldest version first)
  fifo, lru      zset sid -> seq / last touch ms (same members; eviction orders)
  b:<bid>        hash ver, learner, n, acked of a batch claim; b:<bid>:ids list of its sids;
                 b:<bid>:refused hash sid -> reason of frames the cache could not read (inline pulls)
  bclaim         zset bid -> claim deadline (ms)

This module loads Lua source only; `asyncopd.cache.store` runs it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# The stream's consumer group (the Lua names it too, in drop_sample and put_scores).
GROUP = "teachers"

NAMES = (
    "acquire",
    "release",
    "put_rollouts",
    "put_scores",
    "pull",
    "ack",
    "drop_stale_unscored",
    "refuse_unscored",
    "publish",
)


def _read(name: str) -> str:
    return resources.files("asyncopd.cache").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The full source of script `name` (one of `NAMES`): common helpers, then its own body."""
    if name not in NAMES:
        raise ValueError(f"no cache script {name!r}; the scripts are {', '.join(NAMES)}")
    return _read("common") + "\n" + _read(name)
