-- ARGV: now_ms, version, oldest_usable, budget, policy, n,
--       then n x (sid, payload key, payload bytes, checksum, tokens, support) (tokens -1: not declared)
-- -> {'OK', accepted, late, stale, evicted, evicted_bytes, ev_stale} | {'FULL', bytes_held, bytes_new, budget}
--  | {'SHAPE', i, tokens, support}: item i's declared shape is not its unscored rollout's (nothing written)
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
-- The teacher wrote each frame (with a TTL) before this call. Accepted frames are made permanent;
-- late ones (the sample was scored or is gone) are deleted, unless they are the stored frame
-- (a retried request); a missing frame leaves the rollout unscored (re-delivered after its lease).
local W = 6
local now, expected, oldest_usable = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, policy, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local b = 6 + (i - 1) * W
  local sid = ARGV[b + 1]
  local f = redis.call('HMGET', k('s:' .. sid), 'st', 'ov', 'T', 'K')
  local kind
  local tokens, support = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6])
  if f[1] == 'unscored' and tokens >= 0 and (tokens ~= num(f[3]) or support ~= num(f[4])) then
    return {'SHAPE', i, num(f[3]), num(f[4])}
  end
  if seen[sid] or f[1] ~= 'unscored' then
    kind = 'late'
  elseif f[1] and judged(k('s:' .. sid)) < oldest_usable then
    kind = 'stale'
  elseif not frame_ok(ARGV[b + 2], tonumber(ARGV[b + 3])) then
    kind = 'nopayload'
  else
    kind = 'new'
    total = total + tonumber(ARGV[b + 3])
  end
  seen[sid] = true
  kinds[i] = kind
end
local ev_n, ev_bytes, ev_stale = make_room(total, budget, policy, oldest_usable)
if not ev_n then return {'FULL', ev_bytes, total, budget} end
local acc, late, stale = 0, 0, 0
for i = 1, n do
  local b = 6 + (i - 1) * W
  local sid, key, nb = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  local kind = kinds[i]
  if kind == 'late' then
    late = late + 1
    redis.call('HINCRBY', k('cnt'), 'late_scores', 1)
    if redis.call('HGET', k('s:' .. sid), 'ks') ~= key then redis.call('DEL', key) end
  elseif kind == 'nopayload' then
    redis.call('HINCRBY', k('cnt'), 'scores_payload_missing', 1)
    redis.call('DEL', key)
  elseif kind == 'stale' then
    redis.call('DEL', key)
    drop_sample(sid, 'stale')
    stale = stale + 1
  else
    local h = k('s:' .. sid)
    local f = redis.call('HMGET', h, 'ov', 'seq', 'nb')
    redis.call('PERSIST', key)
    redis.call('HSET', h, 'st', 'scored', 'nb', num(f[3]) + nb, 'ks', key, 'ns', nb, 'cs', ARGV[b + 4])
    redis.call('ZREM', k('tclaim'), sid)
    redis.call('ZREM', k('ready'), sid)  -- its lease had run out and it was queued again
    pool_add(sid, judged(h), num(f[2]), now)
    redis.call('HINCRBY', k('cnt'), 'unscored', -1)
    redis.call('HINCRBY', k('cnt'), 'scored', 1)
    redis.call('HINCRBY', k('cnt'), 'bytes', nb)
    acc = acc + 1
  end
end
if acc > 0 then wake('batch') end
if stale + ev_n > 0 then wake('prompts') end
return {'OK', acc, late, stale, ev_n, ev_bytes, ev_stale}
