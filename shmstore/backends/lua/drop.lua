-- ARGV: P, (id, version) pairs -> how many of them were still there and dropped
local n = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local e = redis.call('HGET', K_IDS, id)
  if e and redis.call('HGET', ekey(e, 'r:' .. id), 'v') == ARGV[i + 1] then
    remove(id, e)
    n = n + 1
  end
end
return n
