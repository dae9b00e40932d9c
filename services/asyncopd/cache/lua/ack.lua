-- ARGV: batch_id -> trained count, or -1 for an unknown (or already returned) batch.
-- Acking twice returns the first ack's count (a retried ack after a lost reply is harmless).
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
