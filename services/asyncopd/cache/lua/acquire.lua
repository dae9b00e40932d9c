-- ARGV: now_ms, replica, max, window, lease_ms, token_budget (0 = none), tokens_per_ticket
-- -> {version, finished, reissued_expired, ticket1, pos1, ticket2, pos2, ...}
-- Every ticket handed out (fresh or re-issued) reserves tokens_per_ticket of the token budget
-- (common.lua: reserve); none is handed out that would take cnt.tok_reserved past the budget.
local now, replica, want = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local window, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local tbudget, tk = num(ARGV[6]), num(ARGV[7])
local function tokens_fit()
  return tbudget <= 0 or num(redis.call('HGET', k('cnt'), 'tok_reserved')) + tk <= tbudget
end
local ver = num(redis.call('GET', k('ver')))
if redis.call('GET', k('fin')) == '1' then return {ver, 1, 0} end
local expired = redis.call('ZRANGEBYSCORE', k('tlease'), '-inf', fmt(now))
local n_expired = 0
for _, t in ipairs(expired) do
  redis.call('ZREM', k('tlease'), t)
  if redis.call('EXISTS', k('t:' .. t)) == 1 then
    unreserve(k('t:' .. t))  -- nobody generates it now
    redis.call('RPUSH', k('reissue'), t)
    n_expired = n_expired + 1
  end
end
if n_expired > 0 then redis.call('HINCRBY', k('cnt'), 'prompt_leases_expired', n_expired) end
local out = {ver, 0, n_expired}
local got = 0
while got < want and tokens_fit() do
  local t = redis.call('LPOP', k('reissue'))
  if not t then break end
  local th = k('t:' .. t)
  if redis.call('EXISTS', th) == 1 then
    redis.call('HSET', th, 'replica', replica, 'ver', ver)
    reserve(th, tk)
    redis.call('ZADD', k('tlease'), fmt(now + lease), t)
    out[#out + 1] = t
    out[#out + 1] = redis.call('HGET', th, 'pos')
    got = got + 1
    redis.call('HINCRBY', k('cnt'), 'reissued', 1)
  end
end
-- The window (StalenessPolicy.window): admission slots still open (admitted, neither trained
-- nor dropped; samples the learner trained but acks only after its checkpoint, cnt.consumed,
-- count as trained) plus what was already pulled at this version may not exceed it.
local cnt = redis.call('HMGET', k('cnt'), 'slots', 'consumed')
local free = window - (num(cnt[1]) - num(cnt[2])) - num(redis.call('HGET', k('pulled'), ver))
-- A run state re-created mid-run (Redis lost it) admits nothing fresh until the learner has
-- handed its checkpoint's cursor state back (restore_cursor.lua deletes the hold): fresh
-- admission would start again at position 0, prompts the run has trained already.
if redis.call('EXISTS', k('hold')) == 1 then free = 0 end
local tag = redis.call('GET', k('run'))
while got < want and free > 0 and tokens_fit() do
  local pos = redis.call('INCR', k('cursor')) - 1
  local t = tag .. '-' .. pos
  redis.call('HSET', k('t:' .. t), 'pos', pos, 'replica', replica, 'ver', ver)
  reserve(k('t:' .. t), tk)
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
