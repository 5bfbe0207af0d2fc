-- ARGV: P, e, limit (-1 = none), before ('' = none), newest_first ('1'/'0'),
-- after ('' = none; absent from callers that predate it)
count_op('list')
local e, limit, before, after = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[6] or ''
if limit == 0 then return {} end
local vk, ids = ekey(e, 'v')
local low, high = '-inf', '+inf'
if before ~= '' then high = '(' .. before end
if after ~= '' then low = '(' .. after end
if ARGV[5] == '1' then
  ids = redis.call('ZREVRANGEBYSCORE', vk, high, low, 'LIMIT', 0, limit)
else
  ids = redis.call('ZRANGEBYSCORE', vk, low, high, 'LIMIT', 0, limit)
end
local out = {}
for _, id in ipairs(ids) do out[#out + 1] = record_of(id, e) end
return out
