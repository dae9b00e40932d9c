-- ARGV: version, oldest_usable, sid... -> {'OK', number dropped}
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
-- Unscored rollouts already beyond the bound are dropped at claim time, so no teacher scores
-- work the learner can never use.
local expected, oldest_usable = tonumber(ARGV[1]), tonumber(ARGV[2])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local n = 0
for i = 3, #ARGV do
  local f = redis.call('HMGET', k('s:' .. ARGV[i]), 'st', 'ov')
  if f[1] == 'unscored' and num(f[2]) < oldest_usable then
    drop_sample(ARGV[i], 'stale')
    n = n + 1
  end
end
if n > 0 then wake('prompts') end
return {'OK', n}
