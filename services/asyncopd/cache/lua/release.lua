-- ARGV: replica, ticket... -> released count
local replica, released = ARGV[1], 0
for i = 2, #ARGV do
  local t = ARGV[i]
  local th = k('t:' .. t)
  if redis.call('HGET', th, 'replica') == replica and redis.call('ZREM', k('tlease'), t) == 1 then
    unreserve(th)
    redis.call('RPUSH', k('reissue'), t)
    released = released + 1
  end
end
if released > 0 then
  redis.call('HINCRBY', k('cnt'), 'released', released)
  wake('prompts')
end
return released
