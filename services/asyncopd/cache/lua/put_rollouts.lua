-- ARGV: now_ms, version, oldest_usable, budget, policy, n,
--       then n x (sid, ticket, ov, T, K, payload key, payload bytes, checksum, newest version,
--                 judged version: StalenessPolicy.judged_version, ov or nv by config.stale_tokens)
-- -> {'OK', accepted, duplicates, stale, lost, evicted, evicted_bytes, ev_stale}
--  | {'UNKNOWN', index, ticket} | {'FULL', bytes_held, bytes_new, budget}
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
-- The producer wrote each frame at its payload key (with a TTL) before this call; a stored
-- sample's frame is made permanent here, and a frame that is missing or of another length makes
-- the sample produced-then-dropped ('payload_missing'). Frames of samples not stored are deleted.
local W = 10
local now, expected, oldest_usable = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, policy, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local resets = num(redis.call('HGET', k('cnt'), 'resets'))
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local b = 6 + (i - 1) * W
  local sid, ticket, jv = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 10])
  local kind
  local open = redis.call('EXISTS', k('t:' .. ticket)) == 1
  if seen[ticket] or redis.call('EXISTS', k('s:' .. sid)) == 1 then
    kind = 'dup'
  elseif not open then
    if issued(ticket) then
      kind = 'dup'  -- answered already (e.g. by the replica it was re-issued to)
    elseif resets == 0 then
      return {'UNKNOWN', i - 1, ticket}
    else
      kind = 'lost'
    end
  elseif jv < oldest_usable then
    kind = 'stale'
  elseif not frame_ok(ARGV[b + 6], tonumber(ARGV[b + 7])) then
    kind = 'nopayload'
  else
    kind = 'new'
    total = total + tonumber(ARGV[b + 7])
  end
  seen[ticket] = true
  kinds[i] = kind
end
local ev_n, ev_bytes, ev_stale = make_room(total, budget, policy, oldest_usable)
if not ev_n then return {'FULL', ev_bytes, total, budget} end
local acc, dup, stale, lost, missing, queued, tok_freed = 0, 0, 0, 0, 0, 0, 0
for i = 1, n do
  local b = 6 + (i - 1) * W
  local sid, ticket, key = ARGV[b + 1], ARGV[b + 2], ARGV[b + 6]
  local kind = kinds[i]
  if kind == 'dup' then
    dup = dup + 1
    -- a re-sent frame under a new key is an orphan; a retried request's own key is the stored one
    if redis.call('HGET', k('s:' .. sid), 'kr') ~= key then redis.call('DEL', key) end
  else
    redis.call('HINCRBY', k('cnt'), 'produced', 1)
    redis.call('HINCRBY', k('cnt'), 'tokens_produced', tonumber(ARGV[b + 4]))
    acc = acc + 1
    if kind == 'lost' then
      redis.call('HINCRBY', k('drop'), 'lost', 1)
      redis.call('DEL', key)
      lost = lost + 1
    else
      tok_freed = tok_freed + close_ticket(ticket)
      if kind == 'stale' or kind == 'nopayload' then
        redis.call('HINCRBY', k('drop'), kind == 'stale' and 'stale' or 'payload_missing', 1)
        redis.call('HINCRBY', k('cnt'), 'slots', -1)
        redis.call('DEL', key)
        if kind == 'stale' then stale = stale + 1 else missing = missing + 1 end
      else
        local nb = tonumber(ARGV[b + 7])
        local seq = redis.call('INCR', k('seq'))
        redis.call('ZADD', k('ready'), seq, sid)
        redis.call('PERSIST', key)
        redis.call('HSET', k('s:' .. sid), 'st', 'unscored', 'ov', ARGV[b + 3], 'nv', ARGV[b + 9], 'T', ARGV[b + 4],
          'K', ARGV[b + 5], 'seq', seq, 'nb', nb, 'ticket', ticket, 'kr', key, 'nr', nb, 'cr', ARGV[b + 8],
          'jv', ARGV[b + 10])
        redis.call('HINCRBY', k('cnt'), 'unscored', 1)
        queued = queued + 1
        redis.call('HINCRBY', k('cnt'), 'bytes', nb)
      end
    end
  end
end
if ev_n + stale + missing + tok_freed > 0 then wake('prompts') end  -- admission slots or tokens were freed
if queued > 0 then wake('rollouts') end  -- teachers waiting in ClaimRollouts
return {'OK', acc, dup, stale, lost, ev_n, ev_bytes, ev_stale}
