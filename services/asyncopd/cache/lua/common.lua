-- Helpers every script starts with (asyncopd.cache.scripts prepends this file to each one).
-- KEYS[1] is the run's key prefix; the key layout is described in asyncopd/cache/scripts.py.
-- The numbers the rules compare against (the admission window, the oldest usable version) come
-- in as arguments computed by asyncopd.cache.policy; no script derives them itself.
local P = KEYS[1]
local function k(s) return P .. s end
local SHIFT = 4294967296
local function num(x) return tonumber(x or '0') or 0 end
local function fmt(x) return string.format('%.0f', x) end

-- Wake the cache processes' waiting requests (no polling): 'prompts' when admission may have
-- room (slots freed, a new version, released tickets), 'rollouts' when unscored rollouts were
-- queued for teachers, 'batch' when the scored pool grew.
local function wake(what) redis.call('PUBLISH', k('wake:' .. what), '1') end

-- The token version a sample's staleness is judged by (StalenessPolicy.judged_version, stored
-- as 'jv' by put_rollouts: its oldest token's, or its newest's when stale tokens are masked).
local function judged(h)
  local f = redis.call('HMGET', h, 'jv', 'ov')
  return num(f[1] or f[2])
end

-- `jv` is the judged version: the scored pool is ordered by it, and pull drops what is below the bound.
local function pool_add(sid, jv, seq, now)
  redis.call('ZADD', k('scored'), fmt(jv * SHIFT + seq), sid)
  redis.call('ZADD', k('fifo'), fmt(seq), sid)
  redis.call('ZADD', k('lru'), fmt(now), sid)
end

local function pool_rem(sid)
  redis.call('ZREM', k('scored'), sid)
  redis.call('ZREM', k('fifo'), sid)
  redis.call('ZREM', k('lru'), sid)
end

-- Delete a sample's hash and its payload frames (the keys its producers wrote) together.
local function del_sample(h)
  local f = redis.call('HMGET', h, 'kr', 'ks')
  redis.call('DEL', h)
  if f[1] then redis.call('DEL', f[1]) end
  if f[2] then redis.call('DEL', f[2]) end
end

-- Does the frame at `key` exist with the declared length? (STRLEN is 0 for a missing key.)
local function frame_ok(key, nbytes)
  return nbytes > 0 and redis.call('STRLEN', key) == nbytes
end

-- Remove a stored sample and count it dropped for `reason`; frees its admission slot.
local function drop_sample(sid, reason)
  local h = k('s:' .. sid)
  local f = redis.call('HMGET', h, 'st', 'nb')
  if not f[1] then return 0 end
  if f[1] == 'unscored' then
    redis.call('HINCRBY', k('cnt'), 'unscored', -1)
    redis.call('ZREM', k('ready'), sid)
    redis.call('ZREM', k('tclaim'), sid)
  elseif f[1] == 'scored' then
    pool_rem(sid)
  elseif f[1] == 'claimed' then
    redis.call('HINCRBY', k('cnt'), 'claimed', -1)
  end
  del_sample(h)
  local nb = num(f[2])
  redis.call('HINCRBY', k('cnt'), 'bytes', -nb)
  redis.call('HINCRBY', k('cnt'), 'slots', -1)
  redis.call('HINCRBY', k('drop'), reason, 1)
  return nb
end

-- Victims (scored, unclaimed samples) whose removal frees `need` bytes, without removing
-- them; nil when even all of them would not free enough (or the policy refuses). Under
-- stalest-first, victims older than `oldest_usable` are counted as stale rather than evicted.
local function plan_evictions(need, policy, oldest_usable)
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
      local f = redis.call('HMGET', k('s:' .. sid), 'nb', 'jv', 'ov')
      local reason = 'evicted'
      if policy == 'stalest-first' and num(f[2] or f[3]) < oldest_usable then reason = 'stale' end
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

-- Room for `total` new bytes under `budget`, evicting per `policy`: -> evicted, evicted_bytes,
-- evicted_stale; or nil, bytes_held when nothing evictable frees enough (the put is refused whole).
local function make_room(total, budget, policy, oldest_usable)
  local held = num(redis.call('HGET', k('cnt'), 'bytes'))
  local victims = plan_evictions(held + total - budget, policy, oldest_usable)
  if not victims then return nil, held end
  local ev_stale = 0
  for _, v in ipairs(victims) do if v[2] == 'stale' then ev_stale = ev_stale + 1 end end
  local ev_n, ev_bytes = evict(victims, policy)
  return ev_n, ev_bytes, ev_stale
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

-- Admission's token budget (cache.max_tokens_in_flight): a ticket handed to a replica holds 'tk'
-- tokens of cnt.tok_reserved until its rollout is put, it is released or its lease runs out.
-- cnt.tok_reserved is always the sum of 'tk' over open tickets (never negative).
local function unreserve(th)
  local tk = num(redis.call('HGET', th, 'tk'))
  if tk > 0 then
    redis.call('HSET', th, 'tk', 0)
    redis.call('HINCRBY', k('cnt'), 'tok_reserved', -tk)
  end
  return tk
end

local function reserve(th, tk)
  unreserve(th)
  if tk > 0 then
    redis.call('HSET', th, 'tk', tk)
    redis.call('HINCRBY', k('cnt'), 'tok_reserved', tk)
  end
end

-- Close an answered ticket; -> the tokens its reservation held (freed now).
local function close_ticket(ticket)
  local tk = unreserve(k('t:' .. ticket))
  redis.call('DEL', k('t:' .. ticket))
  redis.call('ZREM', k('tlease'), ticket)
  return tk
end

-- Batch claims past their deadline go back to the pool (a learner died or stalled); a sample
-- claimed `maxd` times already (cache.max_deliveries; its 'ld' count) is dropped as 'poison'
-- instead: it keeps a learner from ever acking. -> returned, poisoned
local function return_expired(now, maxd)
  local bids = redis.call('ZRANGEBYSCORE', k('bclaim'), '-inf', fmt(now))
  local returned, poisoned = 0, 0
  for _, bid in ipairs(bids) do
    redis.call('ZREM', k('bclaim'), bid)
    local bh = k('b:' .. bid)
    local bv = redis.call('HGET', bh, 'ver')
    local ids = redis.call('LRANGE', bh .. ':ids', 0, -1)
    if redis.call('HEXISTS', bh, 'consumed') == 1 then redis.call('HINCRBY', k('cnt'), 'consumed', -#ids) end
    for _, sid in ipairs(ids) do
      local h = k('s:' .. sid)
      local f = redis.call('HMGET', h, 'st', 'ov', 'seq', 'ld', 'jv')
      if f[1] == 'claimed' and maxd and num(f[4]) >= maxd then
        drop_sample(sid, 'poison')
        poisoned = poisoned + 1
      elseif f[1] == 'claimed' then
        redis.call('HSET', h, 'st', 'scored')
        pool_add(sid, num(f[5] or f[2]), num(f[3]), now)
        redis.call('HINCRBY', k('cnt'), 'claimed', -1)
        returned = returned + 1
      end
    end
    if bv then redis.call('HINCRBY', k('pulled'), bv, -#ids) end
    redis.call('DEL', bh, bh .. ':ids', bh .. ':refused')
    redis.call('HINCRBY', k('cnt'), 'batches_returned', 1)
  end
  if poisoned > 0 then wake('prompts') end  -- their admission slots are free
  return returned, poisoned
end


-- Learner epoch fencing (BeginLearner hands out epochs): nil when a learner of `epoch` may act,
-- else the current epoch. Epochs only go up: a higher one is a newer learner (or Redis lost the
-- key) and is recorded; a lower one is a learner that was replaced (it must stop). 0 is an
-- unfenced client (tools, tests): it may act only until a fenced learner began.
local function fenced(epoch)
  epoch = tonumber(epoch) or 0
  local cur = num(redis.call('GET', k('lepoch')))
  if epoch < cur then return cur end
  if epoch > cur then redis.call('SET', k('lepoch'), epoch) end
  return nil
end

-- Redis came back empty (restart without persistence): let the caller rebuild the run state.
if redis.call('EXISTS', k('run')) == 0 then return {'RESET'} end
