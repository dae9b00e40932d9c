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

KEYS[1] is the key prefix (ending in ':'); every key a script touches hangs off it. With
`cache.shards > 1` or `redis.cluster` it is a shard's hash-tagged prefix
`<prefix>:{<prefix>:s<i>}:` (`asyncopd.wire.payload.shard_prefix`): every key under it, the
payload frames its producers wrote included, hashes to that one Redis Cluster slot, and a
cluster client routes the script by KEYS[1]. The key layout (under the prefix):

  run            run id (random; recreated when Redis lost everything)  ver  learner version
  fin            1 once the learner finished                             cursor  next dataset position
  cnt            hash of counters (produced, trained, slots, bytes, unscored, claimed, ...)
  drop           hash reason -> dropped samples       evict  hash policy -> evictions
  served         hash staleness -> samples served     pulled hash version -> samples pulled at it
  t:<ticket>     hash pos, replica, ver of an open admission ticket, tk: tokens it reserves of the
                 token budget while a replica holds it (cnt.tok_reserved is their sum)
  tlease         zset ticket -> lease deadline (ms)   reissue  list of tickets to hand out again
  (tickets are "<run id>-<cursor position>": a ticket of this run below the cursor without an
   open t:<ticket> hash was answered already, so closed tickets need no storage)
  s:<sid>        hash of a sample's metadata: st (unscored/scored/claimed), ov/nv oldest/newest token
                 version, T, K, seq, ticket, nb (bytes counted against the budget),
                 kr/nr/cr rollout frame key/bytes/CRC-32, ks/ns/cs the same for the scores frame,
                 td/ld deliveries to teachers / batch claims so far, teacher (the last one it went to),
                 jv the version its staleness is judged by (StalenessPolicy.judged_version: ov, or nv
                 under stale_tokens: mask; absent = ov)
  pr:<sid>:<nonce>, ps:<sid>:<nonce>
                 payload frames (asyncopd.wire.payload) written by the rollout replica / teacher
                 with a TTL; a put checks STRLEN = declared bytes and PERSISTs them, every script
                 that removes a sample DELs them with its hash; never passed as script arguments
  ready          zset sid -> seq: unscored rollouts no teacher holds (oldest first)
  tclaim         zset sid -> teacher lease deadline (ms): unscored rollouts a teacher holds;
                 expired ones are found with ZRANGEBYSCORE ... LIMIT (no walk over all claims) and
                 go back to `ready`, or are dropped as 'poison' after cache.max_deliveries deliveries
  scored         zset sid -> ov * 2^32 + seq  (scored, unclaimed; oldest version first)
  fifo, lru      zset sid -> seq / last touch ms (same members; eviction orders)
  lepoch         the newest learner's fencing epoch (BeginLearner); pull, ack and publish refuse older ones
  b:<bid>        hash ver, learner, n, acked, consumed (trained; acked after the learner's next
                 checkpoint, counted in cnt.consumed) of a batch claim; b:<bid>:ids list of its sids;
                 b:<bid>:refused hash sid -> reason of frames the cache could not read (inline pulls)
  wseq           write sequence: INCR at the end of every script; lower than a process saw
                 = Redis rolled back (asyncopd.cache.rollback)
  bclaim         zset bid -> claim deadline (ms); an expired claim returns its samples to the
                 pool, except those claimed cache.max_deliveries times: dropped as 'poison'

This module loads Lua source only; `asyncopd.cache.store` runs it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

NAMES = (
    "acquire",
    "release",
    "put_rollouts",
    "put_scores",
    "claim",
    "pull",
    "ack",
    "refuse_unscored",
    "publish",
    "reclaim",  # a batch claim a Redis rollback lost, made again (asyncopd.cache.rollback)
    "begin",
    "restore_cursor",
)


def _read(name: str) -> str:
    return resources.files("asyncopd.cache").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


# After its body every script bumps the write sequence and reads what the rollback guard needs,
# in the same atomic step: it answers {result, wseq, cnt.rollbacks, run} (one EVALSHA, no MULTI
# around it). A body answering nothing answers false (a Lua nil would end the array there).
_EPILOGUE = """
local r = body()
if r == nil then r = false end
return {r, redis.call('INCR', k('wseq')), redis.call('HGET', k('cnt'), 'rollbacks'), redis.call('GET', k('run'))}
"""


@cache
def source(name: str) -> str:
    """The full source of script `name` (one of `NAMES`): common helpers, then its own body run
    as a function, then the rollback guard's epilogue (`_EPILOGUE`)."""
    if name not in NAMES:
        raise ValueError(f"no cache script {name!r}; the scripts are {', '.join(NAMES)}")
    return _read("common") + "\nlocal function body()\n" + _read(name) + "\nend\n" + _EPILOGUE
