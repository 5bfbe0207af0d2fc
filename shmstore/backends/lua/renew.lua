-- ARGV: P, e, node, token, lease ms
count_op('renew')
local lk = ekey(ARGV[2], 'l:' .. ARGV[3])
if redis.call('HGET', lk, 't') ~= ARGV[4] then return 0 end
redis.call('PEXPIRE', lk, ARGV[5])
return 1
