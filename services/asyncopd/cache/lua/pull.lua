-- ARGV: now_ms, learner_version, oldest_usable, size, order, batch_id, learner, claim_ms
-- (oldest_usable is for learner_version, which is the version the batch is served at)
-- -> {'OK', version, returned, stale_dropped, sid1, ov1, ...} | {'WAIT', version, returned, stale_dropped}
--  | {'BEHIND', version}
local now, want_ver, oldest_usable, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local order, bid, learner, claim = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local ver = num(redis.call('GET', k('ver')))
if want_ver < ver then return {'BEHIND', ver} end
local moved = want_ver > ver
if moved then
  -- The learner is the authority on its version; pulling at v publishes v.
  redis.call('SET', k('ver'), want_ver)
  ver = want_ver
end
local returned = return_expired(now)
local stale_ids = redis.call('ZRANGEBYSCORE', k('scored'), '-inf', '(' .. fmt(oldest_usable * SHIFT))
for _, sid in ipairs(stale_ids) do drop_sample(sid, 'stale') end
if moved or #stale_ids > 0 then wake('prompts') end
if returned > 0 then wake('batch') end
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
