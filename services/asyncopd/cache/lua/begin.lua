-- ARGV: floor (the highest learner epoch the calling cache process has seen) -> {epoch, version}
-- A learner starting: the next fencing epoch (above the floor, so a Redis that lost the key
-- still hands out a newer one), and the published version. The claims of earlier epochs can
-- never be acked any more: they expire now, so their samples go back to the pool at once.
local e = math.max(num(redis.call('GET', k('lepoch'))), tonumber(ARGV[1])) + 1
redis.call('SET', k('lepoch'), e)
local bids = redis.call('ZRANGE', k('bclaim'), 0, -1)
for _, bid in ipairs(bids) do redis.call('ZADD', k('bclaim'), 0, bid) end
if #bids > 0 then wake('batch') end
return {e, num(redis.call('GET', k('ver')))}
