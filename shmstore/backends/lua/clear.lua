count_op('clear')
local e = ARGV[2]
local ids = redis.call('ZRANGE', ekey(e, 'v'), 0, -1)
for _, id in ipairs(ids) do remove(id, e) end
return #ids
