"""The cache's Lua scripts: every read-check-write on shared state runs as one atomic script.

Several cache-service processes may share one Redis, and any of them may die between two
commands, so each operation that reads state and then changes it (admission, puts with
eviction, batch claims, acks) is a single script: Redis runs it atomically, and a script
checks everything before it writes anything, so a refused request leaves no trace.

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
  s:<sid>        hash of a sample: r (Rollout bytes), s (TeacherScores bytes), st, ov, seq, nb, xid, T, K
  q              stream of unscored sample ids; consumer group `teachers`
  scored         zset sid -> ov * 2^32 + seq  (scored, unclaimed; oldest version first)
  fifo, lru      zset sid -> seq / last touch ms (same members; eviction orders)
  b:<bid>        hash ver, learner, n, acked of a batch claim; b:<bid>:ids list of its sids
  bclaim         zset bid -> claim deadline (ms)

This module holds Lua source only; `asyncopd.cache.store` runs it.
"""

from __future__ import annotations

GROUP = "teachers"

# Helpers shared by the scripts that change samples.
_COMMON = r"""
local P = KEYS[1]
local function k(s) return P .. s end
local SHIFT = 4294967296
local function num(x) return tonumber(x or '0') or 0 end
local function fmt(x) return string.format('%.0f', x) end

local function pool_add(sid, ov, seq, now)
  redis.call('ZADD', k('scored'), fmt(ov * SHIFT + seq), sid)
  redis.call('ZADD', k('fifo'), fmt(seq), sid)
  redis.call('ZADD', k('lru'), fmt(now), sid)
end

local function pool_rem(sid)
  redis.call('ZREM', k('scored'), sid)
  redis.call('ZREM', k('fifo'), sid)
  redis.call('ZREM', k('lru'), sid)
end

-- Remove a stored sample and count it dropped for `reason`; frees its admission slot.
local function drop_sample(sid, reason)
  local h = k('s:' .. sid)
  local f = redis.call('HMGET', h, 'st', 'nb', 'xid')
  if not f[1] then return 0 end
  if f[1] == 'unscored' then
    redis.call('HINCRBY', k('cnt'), 'unscored', -1)
    if f[3] then
      redis.call('XACK', k('q'), 'teachers', f[3])
      redis.call('XDEL', k('q'), f[3])
    end
  elseif f[1] == 'scored' then
    pool_rem(sid)
  elseif f[1] == 'claimed' then
    redis.call('HINCRBY', k('cnt'), 'claimed', -1)
  end
  redis.call('DEL', h)
  local nb = num(f[2])
  redis.call('HINCRBY', k('cnt'), 'bytes', -nb)
  redis.call('HINCRBY', k('cnt'), 'slots', -1)
  redis.call('HINCRBY', k('drop'), reason, 1)
  return nb
end

-- Victims (scored, unclaimed samples) whose removal frees `need` bytes, without removing
-- them; nil when even all of them would not free enough (or the policy refuses).
local function plan_evictions(need, policy, ver, eta)
  local victims = {}
  if need <= 0 then return victims end
  if policy == 'backpressure' then return nil end
  local key = k('scored')
  if policy == 'lru' then key = k('lru') elseif policy == 'fifo' then key = k('fifo') end
  local freed, offset = 0, 0
  while freed < need do
    local ids = redis.call('ZRANGE', key, offset, offset + 63)
    if #ids == 0 then return nil end
    for _, sid in ipairs(ids) do
      local f = redis.call('HMGET', k('s:' .. sid), 'nb', 'ov')
      local reason = 'evicted'
      if policy == 'stalest-first' and num(f[2]) < ver - eta then reason = 'stale' end
      victims[#victims + 1] = {sid, reason}
      freed = freed + num(f[1])
      if freed >= need then break end
    end
    offset = offset + 64
  end
  return victims
end

local function evict(victims, policy)
  local n, bytes = 0, 0
  for _, v in ipairs(victims) do
    bytes = bytes + drop_sample(v[1], v[2])
    n = n + 1
  end
  if n > 0 then redis.call('HINCRBY', k('evict'), policy, n) end
  return n, bytes
end

-- Was `ticket` handed out by this run's state (its run id, a position below the cursor)?
local function issued(ticket)
  local tag = redis.call('GET', k('run'))
  if not tag then return false end
  local head = tag .. '-'
  if string.sub(ticket, 1, #head) ~= head then return false end
  local rest = string.sub(ticket, #head + 1)
  if not string.match(rest, '^%d+$') then return false end
  return tonumber(rest) < num(redis.call('GET', k('cursor')))
end

local function close_ticket(ticket)
  redis.call('DEL', k('t:' .. ticket))
  redis.call('ZREM', k('tlease'), ticket)
end

-- Batch claims past their deadline go back to the pool (a learner died or stalled).
local function return_expired(now)
  local bids = redis.call('ZRANGEBYSCORE', k('bclaim'), '-inf', fmt(now))
  local returned = 0
  for _, bid in ipairs(bids) do
    redis.call('ZREM', k('bclaim'), bid)
    local bh = k('b:' .. bid)
    local bv = redis.call('HGET', bh, 'ver')
    local ids = redis.call('LRANGE', bh .. ':ids', 0, -1)
    for _, sid in ipairs(ids) do
      local h = k('s:' .. sid)
      local f = redis.call('HMGET', h, 'st', 'ov', 'seq')
      if f[1] == 'claimed' then
        redis.call('HSET', h, 'st', 'scored')
        pool_add(sid, num(f[2]), num(f[3]), now)
        redis.call('HINCRBY', k('cnt'), 'claimed', -1)
        returned = returned + 1
      end
    end
    if bv then redis.call('HINCRBY', k('pulled'), bv, -#ids) end
    redis.call('DEL', bh, bh .. ':ids')
    redis.call('HINCRBY', k('cnt'), 'batches_returned', 1)
  end
  return returned
end

-- Redis came back empty (restart without persistence): let the caller rebuild the run state.
if redis.call('EXISTS', k('run')) == 0 then return {'RESET'} end
"""

# ARGV: now_ms, replica, max, max_staleness, batch_size, lease_ms
# -> {version, finished, reissued_expired, ticket1, pos1, ticket2, pos2, ...}
ACQUIRE = (
    _COMMON
    + r"""
local now, replica, want = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local eta, bsz, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ver = num(redis.call('GET', k('ver')))
if redis.call('GET', k('fin')) == '1' then return {ver, 1, 0} end
local expired = redis.call('ZRANGEBYSCORE', k('tlease'), '-inf', fmt(now))
local n_expired = 0
for _, t in ipairs(expired) do
  redis.call('ZREM', k('tlease'), t)
  if redis.call('EXISTS', k('t:' .. t)) == 1 then
    redis.call('RPUSH', k('reissue'), t)
    n_expired = n_expired + 1
  end
end
if n_expired > 0 then redis.call('HINCRBY', k('cnt'), 'prompt_leases_expired', n_expired) end
local out = {ver, 0, n_expired}
local got = 0
while got < want do
  local t = redis.call('LPOP', k('reissue'))
  if not t then break end
  local th = k('t:' .. t)
  if redis.call('EXISTS', th) == 1 then
    redis.call('HSET', th, 'replica', replica, 'ver', ver)
    redis.call('ZADD', k('tlease'), fmt(now + lease), t)
    out[#out + 1] = t
    out[#out + 1] = redis.call('HGET', th, 'pos')
    got = got + 1
    redis.call('HINCRBY', k('cnt'), 'reissued', 1)
  end
end
-- AReaL-style capacity, per version: admission slots still open (admitted, neither trained nor
-- dropped) plus what was already pulled at this version may not exceed (eta + 1) * batch_size.
local free = (eta + 1) * bsz - num(redis.call('HGET', k('cnt'), 'slots')) - num(redis.call('HGET', k('pulled'), ver))
local tag = redis.call('GET', k('run'))
while got < want and free > 0 do
  local pos = redis.call('INCR', k('cursor')) - 1
  local t = tag .. '-' .. pos
  redis.call('HSET', k('t:' .. t), 'pos', pos, 'replica', replica, 'ver', ver)
  redis.call('ZADD', k('tlease'), fmt(now + lease), t)
  redis.call('HINCRBY', k('cnt'), 'slots', 1)
  redis.call('HINCRBY', k('cnt'), 'fresh', 1)
  out[#out + 1] = t
  out[#out + 1] = tostring(pos)
  got = got + 1
  free = free - 1
end
if got > 0 then redis.call('HINCRBY', k('cnt'), 'admitted', got) end
return out
"""
)

# ARGV: replica, ticket... -> released count
RELEASE = (
    _COMMON
    + r"""
local replica, released = ARGV[1], 0
for i = 2, #ARGV do
  local t = ARGV[i]
  local th = k('t:' .. t)
  if redis.call('HGET', th, 'replica') == replica and redis.call('ZREM', k('tlease'), t) == 1 then
    redis.call('RPUSH', k('reissue'), t)
    released = released + 1
  end
end
if released > 0 then redis.call('HINCRBY', k('cnt'), 'released', released) end
return released
"""
)

# ARGV: now_ms, max_staleness, budget, policy, n, then n x (sid, ticket, ov, T, K, blob)
# -> {'OK', accepted, duplicates, stale, lost, evicted, evicted_bytes, ev_stale}
#  | {'UNKNOWN', index, ticket} | {'FULL', bytes_held, bytes_new, budget}
PUT_ROLLOUTS = (
    _COMMON
    + r"""
local now, eta, budget, policy, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ver = num(redis.call('GET', k('ver')))
local resets = num(redis.call('HGET', k('cnt'), 'resets'))
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local b = 5 + (i - 1) * 6
  local sid, ticket, ov = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  local kind
  local open = redis.call('EXISTS', k('t:' .. ticket)) == 1
  if seen[ticket] or redis.call('EXISTS', k('s:' .. sid)) == 1 then
    kind = 'dup'
  elseif not open then
    if issued(ticket) then
      kind = 'dup'  -- answered already (e.g. by the replica it was re-issued to)
    elseif resets == 0 then
      return {'UNKNOWN', i - 1, ticket}
    else
      kind = 'lost'
    end
  elseif ov < ver - eta then
    kind = 'stale'
  else
    kind = 'new'
    total = total + #ARGV[b + 6]
  end
  seen[ticket] = true
  kinds[i] = kind
end
local bytes = num(redis.call('HGET', k('cnt'), 'bytes'))
local victims = plan_evictions(bytes + total - budget, policy, ver, eta)
if not victims then return {'FULL', bytes, total, budget} end
local ev_stale = 0
for _, v in ipairs(victims) do if v[2] == 'stale' then ev_stale = ev_stale + 1 end end
local ev_n, ev_bytes = evict(victims, policy)
local acc, dup, stale, lost = 0, 0, 0, 0
for i = 1, n do
  local b = 5 + (i - 1) * 6
  local sid, ticket = ARGV[b + 1], ARGV[b + 2]
  local kind = kinds[i]
  if kind == 'dup' then
    dup = dup + 1
  else
    redis.call('HINCRBY', k('cnt'), 'produced', 1)
    acc = acc + 1
    if kind == 'lost' then
      redis.call('HINCRBY', k('drop'), 'lost', 1)
      lost = lost + 1
    else
      close_ticket(ticket)
      if kind == 'stale' then
        redis.call('HINCRBY', k('drop'), 'stale', 1)
        redis.call('HINCRBY', k('cnt'), 'slots', -1)
        stale = stale + 1
      else
        local blob = ARGV[b + 6]
        local seq = redis.call('INCR', k('seq'))
        local xid = redis.call('XADD', k('q'), '*', 'sid', sid)
        redis.call('HSET', k('s:' .. sid), 'r', blob, 'st', 'unscored', 'ov', ARGV[b + 3], 'T', ARGV[b + 4],
          'K', ARGV[b + 5], 'seq', seq, 'nb', #blob, 'xid', xid, 'ticket', ticket)
        redis.call('HINCRBY', k('cnt'), 'unscored', 1)
        redis.call('HINCRBY', k('cnt'), 'bytes', #blob)
      end
    end
  end
end
return {'OK', acc, dup, stale, lost, ev_n, ev_bytes, ev_stale}
"""
)

# ARGV: now_ms, max_staleness, budget, policy, n, then n x (sid, blob)
# -> {'OK', accepted, late, stale, evicted, evicted_bytes, ev_stale} | {'FULL', bytes_held, bytes_new, budget}
PUT_SCORES = (
    _COMMON
    + r"""
local now, eta, budget, policy, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ver = num(redis.call('GET', k('ver')))
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local sid = ARGV[5 + (i - 1) * 2 + 1]
  local f = redis.call('HMGET', k('s:' .. sid), 'st', 'ov')
  local kind
  if seen[sid] or f[1] ~= 'unscored' then
    kind = 'late'
  elseif num(f[2]) < ver - eta then
    kind = 'stale'
  else
    kind = 'new'
    total = total + #ARGV[5 + (i - 1) * 2 + 2]
  end
  seen[sid] = true
  kinds[i] = kind
end
local bytes = num(redis.call('HGET', k('cnt'), 'bytes'))
local victims = plan_evictions(bytes + total - budget, policy, ver, eta)
if not victims then return {'FULL', bytes, total, budget} end
local ev_stale = 0
for _, v in ipairs(victims) do if v[2] == 'stale' then ev_stale = ev_stale + 1 end end
local ev_n, ev_bytes = evict(victims, policy)
local acc, late, stale = 0, 0, 0
for i = 1, n do
  local sid, blob = ARGV[5 + (i - 1) * 2 + 1], ARGV[5 + (i - 1) * 2 + 2]
  local kind = kinds[i]
  if kind == 'late' then
    late = late + 1
    redis.call('HINCRBY', k('cnt'), 'late_scores', 1)
  elseif kind == 'stale' then
    drop_sample(sid, 'stale')
    stale = stale + 1
  else
    local h = k('s:' .. sid)
    local f = redis.call('HMGET', h, 'ov', 'seq', 'nb', 'xid')
    redis.call('HSET', h, 's', blob, 'st', 'scored', 'nb', num(f[3]) + #blob)
    redis.call('XACK', k('q'), 'teachers', f[4])
    redis.call('XDEL', k('q'), f[4])
    pool_add(sid, num(f[1]), num(f[2]), now)
    redis.call('HINCRBY', k('cnt'), 'unscored', -1)
    redis.call('HINCRBY', k('cnt'), 'scored', 1)
    redis.call('HINCRBY', k('cnt'), 'bytes', #blob)
    acc = acc + 1
  end
end
return {'OK', acc, late, stale, ev_n, ev_bytes, ev_stale}
"""
)

# ARGV: now_ms, learner_version, max_staleness, size, order, batch_id, learner, claim_ms
# -> {'OK', version, returned, stale_dropped, sid1, ov1, ...} | {'WAIT', version, returned, stale_dropped}
#  | {'BEHIND', version}
PULL = (
    _COMMON
    + r"""
local now, want_ver, eta, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local order, bid, learner, claim = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local ver = num(redis.call('GET', k('ver')))
if want_ver < ver then return {'BEHIND', ver} end
if want_ver > ver then
  -- The learner is the authority on its version; pulling at v publishes v.
  redis.call('SET', k('ver'), want_ver)
  ver = want_ver
end
local returned = return_expired(now)
local stale_ids = redis.call('ZRANGEBYSCORE', k('scored'), '-inf', '(' .. fmt((ver - eta) * SHIFT))
for _, sid in ipairs(stale_ids) do drop_sample(sid, 'stale') end
if redis.call('ZCARD', k('scored')) < size then return {'WAIT', ver, returned, #stale_ids} end
local ids
if order == 'newest-first' then
  ids = redis.call('ZREVRANGE', k('scored'), 0, size - 1)
else
  ids = redis.call('ZRANGE', k('scored'), 0, size - 1)
end
local out = {'OK', ver, returned, #stale_ids}
local bh = k('b:' .. bid)
for _, sid in ipairs(ids) do
  pool_rem(sid)
  local h = k('s:' .. sid)
  redis.call('HSET', h, 'st', 'claimed')
  local ov = num(redis.call('HGET', h, 'ov'))
  redis.call('HINCRBY', k('served'), ver - ov, 1)
  redis.call('RPUSH', bh .. ':ids', sid)
  out[#out + 1] = sid
  out[#out + 1] = ov
end
redis.call('HSET', bh, 'ver', ver, 'learner', learner, 'n', size)
redis.call('ZADD', k('bclaim'), fmt(now + claim), bid)
redis.call('HINCRBY', k('cnt'), 'claimed', size)
redis.call('HINCRBY', k('cnt'), 'batches', 1)
redis.call('HINCRBY', k('pulled'), ver, size)
return out
"""
)

# ARGV: batch_id -> trained count, or -1 for an unknown (or already returned) batch.
# Acking twice returns the first ack's count (a retried ack after a lost reply is harmless).
ACK = (
    _COMMON
    + r"""
local bh = k('b:' .. ARGV[1])
if redis.call('EXISTS', bh) == 0 then return -1 end
local acked = redis.call('HGET', bh, 'acked')
if acked then return tonumber(acked) end
local ids = redis.call('LRANGE', bh .. ':ids', 0, -1)
local n = 0
for _, sid in ipairs(ids) do
  local h = k('s:' .. sid)
  local f = redis.call('HMGET', h, 'st', 'nb')
  if f[1] == 'claimed' then
    redis.call('DEL', h)
    redis.call('HINCRBY', k('cnt'), 'bytes', -num(f[2]))
    n = n + 1
  end
end
redis.call('HINCRBY', k('cnt'), 'claimed', -n)
redis.call('HINCRBY', k('cnt'), 'slots', -n)
redis.call('HINCRBY', k('cnt'), 'trained', n)
redis.call('HSET', bh, 'acked', n)
redis.call('DEL', bh .. ':ids')
redis.call('ZREM', k('bclaim'), ARGV[1])
redis.call('EXPIRE', bh, 3600)
return n
"""
)

# ARGV: max_staleness, sid... -> number dropped. Unscored rollouts already beyond the bound are
# dropped at claim time, so no teacher scores work the learner can never use.
DROP_STALE_UNSCORED = (
    _COMMON
    + r"""
local eta = tonumber(ARGV[1])
local ver = num(redis.call('GET', k('ver')))
local n = 0
for i = 2, #ARGV do
  local f = redis.call('HMGET', k('s:' .. ARGV[i]), 'st', 'ov')
  if f[1] == 'unscored' and num(f[2]) < ver - eta then
    drop_sample(ARGV[i], 'stale')
    n = n + 1
  end
end
return n
"""
)

# ARGV: version, finished(0/1) -> {'OK', version} | {'BEHIND', version}
PUBLISH = (
    _COMMON
    + r"""
local v = tonumber(ARGV[1])
local cur = num(redis.call('GET', k('ver')))
if v < cur then return {'BEHIND', cur} end
redis.call('SET', k('ver'), v)
if ARGV[2] == '1' then redis.call('SET', k('fin'), '1') end
return {'OK', v}
"""
)
