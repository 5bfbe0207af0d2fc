count_op('delete')
local e = redis.call('HGET', K_IDS, ARGV[2])
if not e then return 0 end
remove(ARGV[2], e)
return 1
