-- ARGV: P, expected ('' = none), one record
count_op('save')
local recs = records_from(3, 1)
if ARGV[2] ~= '' then
  local actual = latest_version(recs[1][2])
  if actual ~= tonumber(ARGV[2]) then return fail({k = 'conflict', actual = num(actual)}) end
end
local L = limits()
local refused, must_evict = admit(L, recs)
if refused then return fail(refused) end
local version = put(L, recs[1])
if must_evict then evict(L) end
return version
