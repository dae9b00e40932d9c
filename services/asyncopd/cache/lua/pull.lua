-- ARGV: now_ms, learner_version, oldest_usable, size, order, batch_id, learner, claim_ms, max_deliveries,
--       learner_epoch, kept batch ids...
-- (oldest_usable is for learner_version, which is the version the batch is served at)
-- -> {'OK', version, returned, stale_dropped, sid1, ov1, <meta of sid1>, sid2, ...} (meta: the sample's ticket, ov,
--     nv, T, K, kr, nr, cr, ks, ns, cs, as claim.lua answers them) | {'WAIT', version, returned, stale_dropped}
--  | {'BEHIND', version} | {'FENCED', epoch} | {'KEPT', version} (size 0: keep-alive of the kept batches only)
-- Kept batches were trained and are acked after the learner's next checkpoint: their claims are
-- extended by claim_ms, and their samples marked consumed once (cnt.consumed: admission counts
-- their slots free, acquire.lua), so deferred acks never hold admission shut.
local now, want_ver, oldest_usable, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local order, bid, learner, claim = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local fence = fenced(tonumber(ARGV[10]))
if fence then return {'FENCED', fence} end
local consumed = false
for i = 11, #ARGV do
  local kh = k('b:' .. ARGV[i])
  if redis.call('ZSCORE', k('bclaim'), ARGV[i]) then
    redis.call('ZADD', k('bclaim'), fmt(now + claim), ARGV[i])
    if redis.call('HSETNX', kh, 'consumed', 1) == 1 then
      redis.call('HINCRBY', k('cnt'), 'consumed', redis.call('LLEN', kh .. ':ids'))
      consumed = true
    end
  end
end
if size == 0 then
  -- Keep-alive only (a learner waiting out a failed checkpoint): claims extended, nothing claimed,
  -- the version untouched.
  if consumed then wake('prompts') end
  return {'KEPT', num(redis.call('GET', k('ver'))), 0, 0}
end
local ver = num(redis.call('GET', k('ver')))
if want_ver < ver then return {'BEHIND', ver} end
local moved = want_ver > ver
if moved then
  -- The learner is the authority on its version; pulling at v publishes v.
  redis.call('SET', k('ver'), want_ver)
  ver = want_ver
end
local returned = return_expired(now, tonumber(ARGV[9]))
local stale_ids = redis.call('ZRANGEBYSCORE', k('scored'), '-inf', '(' .. fmt(oldest_usable * SHIFT))
for _, sid in ipairs(stale_ids) do drop_sample(sid, 'stale') end
if moved or consumed or #stale_ids > 0 then wake('prompts') end
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
  redis.call('HINCRBY', h, 'ld', 1)  -- batch claims of this sample (capped: return_expired)
  local f = redis.call('HMGET', h, 'ticket', 'ov', 'nv', 'T', 'K', 'kr', 'nr', 'cr', 'ks', 'ns', 'cs')
  local ov = num(f[2])
  redis.call('HINCRBY', k('served'), ver - ov, 1)
  -- kept under stale_tokens: mask (judged by its newest token): the learner masks its tokens older
  -- than oldest_usable; counted once per claim (a returned and re-claimed batch counts again)
  if ov < oldest_usable then redis.call('HINCRBY', k('cnt'), 'masked_samples', 1) end
  redis.call('RPUSH', bh .. ':ids', sid)
  out[#out + 1] = sid
  out[#out + 1] = ov
  for j = 1, #f do out[#out + 1] = f[j] end
end
redis.call('HSET', bh, 'ver', ver, 'learner', learner, 'n', size)
redis.call('ZADD', k('bclaim'), fmt(now + claim), bid)
redis.call('HINCRBY', k('cnt'), 'claimed', size)
redis.call('HINCRBY', k('cnt'), 'batches', 1)
redis.call('HINCRBY', k('pulled'), ver, size)
return out
