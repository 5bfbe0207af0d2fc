-- ARGV: P, e, node, owner, lease ms, count
if ARGV[6] == '1' then count_op('claim') end
local e, node, owner = ARGV[2], ARGV[3], ARGV[4]
local rec = latest_of_node(e, node)
if rec then return {'done', rec} end
local lk = ekey(e, 'l:' .. node)
local lease = redis.call('HMGET', lk, 't', 'o')
if not lease[1] then
  local token = 'redis-' .. redis.call('HINCRBY', K_STATS, 'tokens', 1)
  redis.call('HSET', lk, 't', token, 'o', owner)
  redis.call('PEXPIRE', lk, ARGV[5])
  return {'granted', token}
end
if lease[2] == owner then return {'held', owner} end
return {'busy', lease[2], redis.call('PTTL', lk)}
