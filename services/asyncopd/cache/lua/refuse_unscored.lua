-- ARGV: pairs (sid, reason) -> number dropped
-- A teacher could not read these rollouts' frames (corrupt or gone): drop the ones still
-- unscored with the reason, so they are not re-delivered forever.
local n = 0
for i = 1, #ARGV - 1, 2 do
  if redis.call('HGET', k('s:' .. ARGV[i]), 'st') == 'unscored' then
    drop_sample(ARGV[i], ARGV[i + 1])
    n = n + 1
  end
end
if n > 0 then wake('prompts') end
return n
