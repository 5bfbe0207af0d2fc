-- ARGV: P, id
count_op('load')
local e = redis.call('HGET', K_IDS, ARGV[2])
if not e then return false end
return record_of(ARGV[2], e)
