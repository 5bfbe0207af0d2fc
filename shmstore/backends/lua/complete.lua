-- ARGV: P, token, one record
count_op('complete')
local recs = records_from(3, 1)
local r = recs[1]
local existing = latest_of_node(r[2], r[3])
if existing then
  drop_lease(r[2], r[3], ARGV[2])
  return {'done', existing}
end
local L = limits()
local refused, must_evict = admit(L, recs)
if refused then return fail(refused) end
local version = put(L, r)
if must_evict then evict(L) end
drop_lease(r[2], r[3], ARGV[2])
return {'saved', version}
