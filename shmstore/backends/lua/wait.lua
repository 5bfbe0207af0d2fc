-- ARGV: P, e, after, count ('1'/'0'), ttl ms of the generation key (0: the wait is
-- over), the waiter's generation (0: take the present one)
-- -> {1, record, generation} or {0, 0, generation}
if ARGV[4] == '1' then count_op('wait') end
local e, after, ttl, start = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rec = latest(e)
local now = tonumber(redis.call('GET', ekey(e, 'g')) or '0')
if start == 0 then start = now end
-- A record in a later generation than the waiter's: the execution restarted since.
if rec and (rec[4] > after or (start ~= 0 and now ~= start)) then return {1, rec, start} end
if ttl > 0 then
  local g = generation(e, ttl)
  if start == 0 then start = g end
end
return {0, 0, start}
