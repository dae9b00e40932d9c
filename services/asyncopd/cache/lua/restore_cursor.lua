-- ARGV: learner_epoch, cursor, run id the state was read from ('' = unknown), whether there is a
--       saved state ('1'/'0'), n open positions, then the n open positions, then the positions the
--       learner trained since that state (its unsaved batches' tickets, read by the store)
-- -> {'OK', positions re-opened} | {'FENCED', epoch}
-- A checkpoint's prompt cursor state (CursorState) back into a Redis whose cursor is behind it
-- because it lost its state: the cursor moves up to it (and past every position the learner
-- trained since), each open position (admitted but neither trained nor dropped when the
-- checkpoint was taken) and each position admitted after it but not trained gets a ticket on the
-- re-issue list; the trained ones do not. Any call releases the hold a re-created run state puts
-- on fresh admission (acquire.lua): the learner has handed over what it knows.
-- A Redis whose cursor is not behind kept its state and is left alone; so is one that still holds
-- the run the state was read from: its cursor is behind only because it rolled back (an AOF cut
-- short), and positions it admitted since may be answered and trained already, so re-opening
-- them would train a prompt twice (the rollback recovery, reclaim.lua, repairs that state).
local fence = fenced(tonumber(ARGV[1]))
if fence then return {'FENCED', fence} end
if redis.call('DEL', k('hold')) == 1 then wake('prompts') end
local want, has_saved, n_open = tonumber(ARGV[2]), ARGV[4] == '1', tonumber(ARGV[5])
local trained, top = {}, want
for i = 6 + n_open, #ARGV do
  local p = tonumber(ARGV[i])
  trained[p] = true
  if p + 1 > top then top = p + 1 end
end
if num(redis.call('GET', k('cursor'))) >= top then return {'OK', 0} end
if ARGV[3] ~= '' and redis.call('GET', k('run')) == ARGV[3] then return {'OK', 0} end
local tag = redis.call('GET', k('run'))
local ver = num(redis.call('GET', k('ver')))
redis.call('SET', k('cursor'), top)
local n = 0
local function reopen(p)
  if trained[p] then return end
  local t = tag .. '-' .. p
  if redis.call('EXISTS', k('t:' .. t)) == 0 then
    redis.call('HSET', k('t:' .. t), 'pos', p, 'replica', '', 'ver', ver)
    redis.call('RPUSH', k('reissue'), t)
    n = n + 1
  end
end
for i = 6, 5 + n_open do reopen(tonumber(ARGV[i])) end
-- admitted after the saved state, not trained by the learner (without a saved state nothing
-- says which positions below were trained: they are skipped rather than trained twice)
if has_saved then
  for p = want, top - 1 do reopen(p) end
end
redis.call('HINCRBY', k('cnt'), 'slots', n)
redis.call('HINCRBY', k('cnt'), 'cursor_restores', 1)
redis.call('HINCRBY', k('cnt'), 'cursor_reopened', n)
wake('prompts')
return {'OK', n}
