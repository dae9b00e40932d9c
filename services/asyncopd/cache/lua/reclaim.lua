-- A batch claim Redis lost in a rollback, made again (asyncopd.cache.rollback): the learner holds
-- this batch and trains it, so its samples must not stay in the pool for another batch, and the
-- prompts they answered must not be handed out again.
-- ARGV: now_ms, claim_ms, batch_id, version, learner, then triples (sid, ticket, oldest version)
-- -> {reclaimed, recreated, missing}: samples claimed again; samples Redis lost altogether
--    (their put went with the rollback), re-created as claimed (no frames: the learner has their
--    data) and counted produced; samples another batch claimed meanwhile or whose prompt this
--    state already counts answered (reported, not hidden)
-- A re-created sample closes its ticket; a ticket at or past the cursor (its admission was lost
-- too) moves the cursor past it, and the positions it skips get open tickets to hand out again.
-- A batch Redis still knows (claimed or acked) is left alone.
local now, claim, bid, ver, learner = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local bh = k('b:' .. bid)
if redis.call('EXISTS', bh) == 1 then return {0, 0, 0} end
local tag = redis.call('GET', k('run'))
local n, recreated, missing = 0, 0, 0
for i = 6, #ARGV - 2, 3 do
  local sid, ticket, ov = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h = k('s:' .. sid)
  local st = redis.call('HGET', h, 'st')
  local take = false
  if st == 'scored' then
    pool_rem(sid)
    take = true
  elseif st == 'unscored' then  -- its scores were lost too; the learner has them
    redis.call('ZREM', k('ready'), sid)
    redis.call('ZREM', k('tclaim'), sid)
    redis.call('HINCRBY', k('cnt'), 'unscored', -1)
    take = true
  elseif not st and ticket ~= '' then
    local head = tag .. '-'
    local pos = nil
    if string.sub(ticket, 1, #head) == head then pos = tonumber(string.sub(ticket, #head + 1)) end
    local cursor = num(redis.call('GET', k('cursor')))
    if redis.call('EXISTS', k('t:' .. ticket)) == 1 then
      close_ticket(ticket)  -- admitted in this state, answer lost: its slot is counted already
      take = true
    elseif pos and pos >= cursor then
      -- the admission was lost too: re-admit the positions before it for handing out again
      for q = cursor, pos - 1 do
        local t = tag .. '-' .. q
        redis.call('HSET', k('t:' .. t), 'pos', q, 'replica', '', 'ver', ver)
        redis.call('RPUSH', k('reissue'), t)
      end
      local admitted = pos - cursor + 1
      redis.call('SET', k('cursor'), pos + 1)
      redis.call('HINCRBY', k('cnt'), 'slots', admitted)
      redis.call('HINCRBY', k('cnt'), 'admitted', admitted)
      take = true
    end
    if take then
      -- nb 1, counted in bytes: the ack subtracts what it finds (a 0 would reach it as '-0')
      redis.call('HSET', h, 'st', 'claimed', 'ov', ov, 'nv', ov, 'T', 0, 'K', 0, 'nb', 1, 'ticket', ticket)
      redis.call('HINCRBY', k('cnt'), 'bytes', 1)
      redis.call('HINCRBY', k('cnt'), 'produced', 1)
      recreated = recreated + 1
    end
  end
  if take then
    redis.call('HSET', h, 'st', 'claimed')
    redis.call('HINCRBY', h, 'ld', 1)
    redis.call('RPUSH', bh .. ':ids', sid)
    n = n + 1
  else
    missing = missing + 1
  end
end
if n == 0 then return {0, 0, missing} end
redis.call('HSET', bh, 'ver', ver, 'learner', learner, 'n', n)
redis.call('ZADD', k('bclaim'), fmt(now + claim), bid)
redis.call('HINCRBY', k('cnt'), 'claimed', n)
redis.call('HINCRBY', k('pulled'), ver, n)
redis.call('HINCRBY', k('cnt'), 'reclaimed', n)
if recreated > 0 then redis.call('HINCRBY', k('cnt'), 'recreated', recreated) end
wake('prompts')
return {n - recreated, recreated, missing}
