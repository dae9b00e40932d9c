-- ARGV: now_ms, teacher, max, lease_ms, max_deliveries, version, oldest_usable
-- -> {'OK', redelivered, stale_dropped, poisoned, leases_expired, sid1, <meta of sid1>, sid2, ...}
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
-- <meta> is the sample hash's ticket, ov, nv, T, K, kr, nr, cr, ks, ns, cs (store._META_FIELDS).
-- Unscored rollouts wait in `ready` (by seq); a teacher's claim moves them to `tclaim` (by lease
-- deadline). Leases past their deadline are found by score, never by walking every claim: each
-- goes back to `ready`, or is dropped as 'poison' once delivered max_deliveries times (a rollout
-- that kills every teacher it reaches). Rollouts already beyond the staleness bound are dropped
-- here instead of handed out, so no teacher scores work the learner can never use.
local now, teacher, want = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local lease, maxd = tonumber(ARGV[4]), tonumber(ARGV[5])
local expected, oldest_usable = tonumber(ARGV[6]), tonumber(ARGV[7])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local expired = redis.call('ZRANGEBYSCORE', k('tclaim'), '-inf', fmt(now), 'LIMIT', 0, 256)
local poisoned = 0
for _, sid in ipairs(expired) do
  redis.call('ZREM', k('tclaim'), sid)
  local f = redis.call('HMGET', k('s:' .. sid), 'seq', 'td')
  if not f[1] then
    -- its sample is gone (a state Redis lost part of): nothing to hand out again
  elseif num(f[2]) >= maxd then
    drop_sample(sid, 'poison')
    poisoned = poisoned + 1
  else
    redis.call('ZADD', k('ready'), f[1], sid)
  end
end
if #expired > 0 then redis.call('HINCRBY', k('cnt'), 'teacher_leases_expired', #expired) end
local out = {'OK', 0, 0, poisoned, #expired}
local got, redelivered, stale = 0, 0, 0
while got < want do
  local ids = redis.call('ZRANGE', k('ready'), 0, want - got - 1)
  if #ids == 0 then break end
  for _, sid in ipairs(ids) do
    local h = k('s:' .. sid)
    local f = redis.call('HMGET', h, 'td', 'ticket', 'ov', 'nv', 'T', 'K', 'kr', 'nr', 'cr', 'ks', 'ns', 'cs')
    if not f[7] then
      redis.call('ZREM', k('ready'), sid)  -- a queue entry without its sample: drop the entry
    elseif judged(h) < oldest_usable then
      drop_sample(sid, 'stale')
      stale = stale + 1
    else
      redis.call('ZREM', k('ready'), sid)
      redis.call('ZADD', k('tclaim'), fmt(now + lease), sid)
      redis.call('HSET', h, 'td', num(f[1]) + 1, 'teacher', teacher)
      if num(f[1]) > 0 then redelivered = redelivered + 1 end
      out[#out + 1] = sid
      for j = 2, #f do out[#out + 1] = f[j] end
      got = got + 1
    end
  end
end
if redelivered > 0 then redis.call('HINCRBY', k('cnt'), 'redelivered', redelivered) end
if stale + poisoned > 0 then wake('prompts') end  -- their admission slots are free
out[2], out[3] = redelivered, stale
return out
