-- -> {checkpoints, executions, payload_bytes, ops (flat), stats (flat), largest (flat)}
count_op('stats')
local top = {}
local flat = redis.call('HGETALL', K_EBYTES)
for i = 1, #flat, 2 do
  local size = tonumber(flat[i + 1])
  local pos = #top + 1
  while pos > 1 and top[pos - 1][2] < size do pos = pos - 1 end
  if pos <= 5 then
    table.insert(top, pos, {flat[i], size})
    if #top > 5 then table.remove(top) end
  end
end
local largest = {}
for _, t in ipairs(top) do
  largest[#largest + 1] = t[1]
  largest[#largest + 1] = redis.call('HGET', K_EXECS, t[1])
  largest[#largest + 1] = num(t[2])
end
return {redis.call('HLEN', K_IDS), redis.call('HLEN', K_EXECS), num(stored_bytes()),
        redis.call('HGETALL', K_OPS), redis.call('HGETALL', K_STATS), largest,
        redis.call('INFO', 'server'), redis.call('INFO', 'memory')}
