-- ARGV: batch_id, learner_epoch, then pairs (sid, reason) of samples the learner refused (their
-- frames were corrupt or gone) -> trained count, or -1 for an unknown (or already returned) batch,
-- or {'FENCED', epoch} when a newer learner began.
-- Refused samples of the batch are dropped with their reason instead of counted trained.
-- Acking twice returns the first ack's count (a retried ack after a lost reply is harmless).
local fence = fenced(tonumber(ARGV[2]))
if fence then return {'FENCED', fence} end
local bh = k('b:' .. ARGV[1])
local refused = {}
local noted = redis.call('HGETALL', bh .. ':refused')  -- frames the cache itself could not read
for i = 1, #noted - 1, 2 do refused[noted[i]] = noted[i + 1] end
for i = 3, #ARGV - 1, 2 do refused[ARGV[i]] = ARGV[i + 1] end
if redis.call('EXISTS', bh) == 0 then return -1 end
local acked = redis.call('HGET', bh, 'acked')
if acked then return tonumber(acked) end
local ids = redis.call('LRANGE', bh .. ':ids', 0, -1)
if redis.call('HEXISTS', bh, 'consumed') == 1 then redis.call('HINCRBY', k('cnt'), 'consumed', -#ids) end
local n = 0
for _, sid in ipairs(ids) do
  local h = k('s:' .. sid)
  local f = redis.call('HMGET', h, 'st', 'nb')
  if f[1] == 'claimed' and refused[sid] then
    drop_sample(sid, refused[sid])
  elseif f[1] == 'claimed' then
    del_sample(h)
    redis.call('HINCRBY', k('cnt'), 'bytes', -num(f[2]))
    n = n + 1
  end
end
redis.call('HINCRBY', k('cnt'), 'claimed', -n)
redis.call('HINCRBY', k('cnt'), 'slots', -n)
redis.call('HINCRBY', k('cnt'), 'trained', n)
redis.call('HSET', bh, 'acked', n)
redis.call('DEL', bh .. ':ids', bh .. ':refused')
redis.call('ZREM', k('bclaim'), ARGV[1])
redis.call('EXPIRE', bh, 3600)
wake('prompts')
return n
