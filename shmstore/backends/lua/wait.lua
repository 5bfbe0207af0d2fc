-- ARGV: P, e, after, count ('1'/'0'), ttl ms of the generation key while the execution
-- is empty (the waiter's slice and a grace), the waiter's generation (0: take the
-- present one)
-- -> {1, record, the execution's generation now} or {0, 0, the waiter's generation}
if ARGV[4] == '1' then count_op('wait') end
local e, after, ttl, start = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rec = latest(e)
local now = generation(e, ttl)
if start == 0 then start = now end
-- A record in a later generation than the waiter's: the execution restarted since.
if rec and (rec[4] > after or (start ~= 0 and now ~= start)) then return {1, rec, now} end
return {0, 0, start}
