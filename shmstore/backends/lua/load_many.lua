-- ARGV: P, ids...  -> {1, records} or {0, missing id}
count_op('load_many')
local out = {}
for i = 2, #ARGV do
  local e = redis.call('HGET', K_IDS, ARGV[i])
  if not e then return {0, ARGV[i]} end
  out[#out + 1] = record_of(ARGV[i], e)
end
return {1, out}
