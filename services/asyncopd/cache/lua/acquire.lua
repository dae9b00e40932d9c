-- ARGV: now_ms, replica, max, window, lease_ms
-- -> {version, finished, reissued_expired, ticket1, pos1, ticket2, pos2, ...}
local now, replica, want = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local window, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
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
-- The window (StalenessPolicy.window): admission slots still open (admitted, neither trained
-- nor dropped) plus what was already pulled at this version may not exceed it.
local free = window - num(redis.call('HGET', k('cnt'), 'slots')) - num(redis.call('HGET', k('pulled'), ver))
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
