-- The records of the executions in scope, for find, purge and copy.
-- ARGV: P, op to count, prefix ('1'/'0'), node or '', has node, checkpoint id or '',
-- before id or '', children node or '', has children, limit (-1: none), by id
-- ('1'/'0'), names...
-- -> {name, records newest first (version, or id with by id) that pass the filters,
--     children oldest first}...
if ARGV[2] ~= '' then count_op(ARGV[2]) end
local limit = tonumber(ARGV[10])
if limit == 0 then return {} end
-- Byte order (= code point order of UTF-8), not the server's locale (strcoll).
local function lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local names, seen = {}, {}
if ARGV[3] == '1' then
  for _, name in ipairs(redis.call('HKEYS', K_EXECS)) do
    for i = 12, #ARGV do
      if string.sub(name, 1, #ARGV[i]) == ARGV[i] then names[#names + 1] = name; break end
    end
  end
else
  for i = 12, #ARGV do
    local name = ARGV[i]
    if not seen[name] and redis.call('HEXISTS', K_EXECS, name) == 1 then
      seen[name] = true
      names[#names + 1] = name
    end
  end
end
table.sort(names, lt)
local node, has_node, only, before = ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7]
local out, total = {}, 0
for _, e in ipairs(names) do
  local ids
  if only ~= '' then
    if redis.call('HGET', K_IDS, only) == e then ids = {only} else ids = {} end
  else
    ids = redis.call('ZREVRANGE', ekey(e, 'v'), 0, -1)
    if ARGV[11] == '1' then table.sort(ids, function(a, b) return lt(b, a) end) end
  end
  local found = {}
  for _, id in ipairs(ids) do
    if before == '' or lt(id, before) then
      local r = record_of(id, e)
      if not has_node or r[3] == node then
        found[#found + 1] = r
        total = total + 1
        if limit > 0 and total >= limit then break end
      end
    end
  end
  local kids = {}
  if ARGV[9] == '1' and #found > 0 then
    for _, id in ipairs(redis.call('ZRANGE', ekey(e, 'v'), 0, -1)) do
      if redis.call('HGET', ekey(e, 'r:' .. id), 'n') == ARGV[8] then
        kids[#kids + 1] = record_of(id, e)
      end
    end
  end
  out[#out + 1] = {e, found, kids}
  if limit > 0 and total >= limit then break end
end
return out
