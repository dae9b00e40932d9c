-- ARGV: version, finished(0/1), learner_epoch -> {'OK', version} | {'BEHIND', version} | {'FENCED', epoch}
local fence = fenced(tonumber(ARGV[3]))
if fence then return {'FENCED', fence} end
local v = tonumber(ARGV[1])
local cur = num(redis.call('GET', k('ver')))
if v < cur then return {'BEHIND', cur} end
redis.call('SET', k('ver'), v)
if ARGV[2] == '1' then redis.call('SET', k('fin'), '1') end
if v > cur or ARGV[2] == '1' then wake('prompts') end
return {'OK', v}
