-- ARGV: now_ms, version, oldest_usable, budget, policy, n, then n x (sid, blob)
-- -> {'OK', accepted, late, stale, evicted, evicted_bytes, ev_stale} | {'FULL', bytes_held, bytes_new, budget}
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
local now, expected, oldest_usable = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, policy, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local sid = ARGV[6 + (i - 1) * 2 + 1]
  local f = redis.call('HMGET', k('s:' .. sid), 'st', 'ov')
  local kind
  if seen[sid] or f[1] ~= 'unscored' then
    kind = 'late'
  elseif num(f[2]) < oldest_usable then
    kind = 'stale'
  else
    kind = 'new'
    total = total + #ARGV[6 + (i - 1) * 2 + 2]
  end
  seen[sid] = true
  kinds[i] = kind
end
local bytes = num(redis.call('HGET', k('cnt'), 'bytes'))
local victims = plan_evictions(bytes + total - budget, policy, oldest_usable)
if not victims then return {'FULL', bytes, total, budget} end
local ev_stale = 0
for _, v in ipairs(victims) do if v[2] == 'stale' then ev_stale = ev_stale + 1 end end
local ev_n, ev_bytes = evict(victims, policy)
local acc, late, stale = 0, 0, 0
for i = 1, n do
  local sid, blob = ARGV[6 + (i - 1) * 2 + 1], ARGV[6 + (i - 1) * 2 + 2]
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
