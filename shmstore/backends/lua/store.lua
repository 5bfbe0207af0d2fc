-- save_many, save_new and copy.  ARGV: P, op to count ('' = none), only new ids
-- ('1'/'0'), n, n records -> versions (0 for a record skipped as not new)
if ARGV[2] ~= '' then count_op(ARGV[2]) end
local recs = records_from(5, tonumber(ARGV[4]))
local chosen, pos, versions = {}, {}, {}
for i = 1, #recs do versions[i] = 0 end
if ARGV[3] == '1' then
  local seen = {}
  for i, r in ipairs(recs) do
    if not seen[r[1]] and redis.call('HEXISTS', K_IDS, r[1]) == 0 then
      seen[r[1]] = true
      chosen[#chosen + 1] = r
      pos[#pos + 1] = i
    end
  end
else
  chosen = recs
  for i = 1, #recs do pos[i] = i end
end
if #chosen > 0 then
  local L = limits()
  local refused, must_evict = admit(L, chosen)
  if refused then return fail(refused) end
  for j, r in ipairs(chosen) do versions[pos[j]] = put(L, r) end
  if must_evict then evict(L) end
end
return versions
