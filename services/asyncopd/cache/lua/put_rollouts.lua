-- ARGV: now_ms, version, oldest_usable, budget, policy, n, then n x (sid, ticket, ov, T, K, blob)
-- -> {'OK', accepted, duplicates, stale, lost, evicted, evicted_bytes, ev_stale}
--  | {'UNKNOWN', index, ticket} | {'FULL', bytes_held, bytes_new, budget}
--  | {'VERSION', version}: oldest_usable was computed for another learner version; recompute, rerun
local now, expected, oldest_usable = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, policy, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local ver = num(redis.call('GET', k('ver')))
if ver ~= expected then return {'VERSION', ver} end
local resets = num(redis.call('HGET', k('cnt'), 'resets'))
local kinds, seen, total = {}, {}, 0
for i = 1, n do
  local b = 6 + (i - 1) * 6
  local sid, ticket, ov = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
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
  elseif ov < oldest_usable then
    kind = 'stale'
  else
    kind = 'new'
    total = total + #ARGV[b + 6]
  end
  seen[ticket] = true
  kinds[i] = kind
end
local bytes = num(redis.call('HGET', k('cnt'), 'bytes'))
local victims = plan_evictions(bytes + total - budget, policy, oldest_usable)
if not victims then return {'FULL', bytes, total, budget} end
local ev_stale = 0
for _, v in ipairs(victims) do if v[2] == 'stale' then ev_stale = ev_stale + 1 end end
local ev_n, ev_bytes = evict(victims, policy)
local acc, dup, stale, lost = 0, 0, 0, 0
for i = 1, n do
  local b = 6 + (i - 1) * 6
  local sid, ticket = ARGV[b + 1], ARGV[b + 2]
  local kind = kinds[i]
  if kind == 'dup' then
    dup = dup + 1
  else
    redis.call('HINCRBY', k('cnt'), 'produced', 1)
    acc = acc + 1
    if kind == 'lost' then
      redis.call('HINCRBY', k('drop'), 'lost', 1)
      lost = lost + 1
    else
      close_ticket(ticket)
      if kind == 'stale' then
        redis.call('HINCRBY', k('drop'), 'stale', 1)
        redis.call('HINCRBY', k('cnt'), 'slots', -1)
        stale = stale + 1
      else
        local blob = ARGV[b + 6]
        local seq = redis.call('INCR', k('seq'))
        local xid = redis.call('XADD', k('q'), '*', 'sid', sid)
        redis.call('HSET', k('s:' .. sid), 'r', blob, 'st', 'unscored', 'ov', ARGV[b + 3], 'T', ARGV[b + 4],
          'K', ARGV[b + 5], 'seq', seq, 'nb', #blob, 'xid', xid, 'ticket', ticket)
        redis.call('HINCRBY', k('cnt'), 'unscored', 1)
        redis.call('HINCRBY', k('cnt'), 'bytes', #blob)
      end
    end
  end
end
return {'OK', acc, dup, stale, lost, ev_n, ev_bytes, ev_stale}
