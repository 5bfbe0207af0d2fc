-- Shared by every script: RedisStore prepends this file to each <op>.lua before loading it,
-- and puts the Python default of max_checkpoint_bytes (core/limits.py) in place of the
-- name DEFAULT_MAX_CHECKPOINT_BYTES below, so that the default is written once.
-- Every script gets the prefix as ARGV[1].  Numbers that may pass 2^53 never go through
-- Lua numbers: timestamps stay strings; counts and sizes are far below it.
local P = ARGV[1]
local K_IDS, K_ORDER, K_STATS = P .. 'ids', P .. 'order', P .. 'stats'
local K_EXECS, K_EBYTES, K_OPS, K_LIMITS = P .. 'execs', P .. 'ebytes', P .. 'ops', P .. 'limits'

local function tag(e)
  if string.find(e, '[{}]') or string.sub(e, 1, 1) == '~' then
    local hex = string.gsub(e, '.', function(c) return string.format('%02x', string.byte(c)) end)
    return '~' .. hex
  end
  return e
end
local function ekey(e, suffix) return P .. '{' .. tag(e) .. '}:' .. suffix end
-- A counter must not turn a read into a refused write when Redis is at maxmemory.
local function count_op(op) redis.pcall('HINCRBY', K_OPS, op, 1) end
local function fail(t) return redis.error_reply('SHMSTORE ' .. cjson.encode(t)) end
local function num(n) return string.format('%d', n) end

local function record_of(id, e)
  local f = redis.call('HMGET', ekey(e, 'r:' .. id), 'n', 'v', 't', 'p', 'm', 's')
  if not f[2] then return false end
  return {id, e, f[1], tonumber(f[2]), f[3], f[4], f[5], f[6]}
end

local function latest_version(e)
  local top = redis.call('ZREVRANGE', ekey(e, 'v'), 0, 0, 'WITHSCORES')
  if top[2] then return tonumber(top[2]) end
  return 0
end

local function latest(e)
  local top = redis.call('ZREVRANGE', ekey(e, 'v'), 0, 0)
  if top[1] then return record_of(top[1], e) end
  return false
end

local function latest_of_node(e, node)
  local ids = redis.call('ZREVRANGE', ekey(e, 'v'), 0, -1)
  for _, id in ipairs(ids) do
    if redis.call('HGET', ekey(e, 'r:' .. id), 'n') == node then return record_of(id, e) end
  end
  return false
end

-- A wake-up is a message on the execution's channel: it needs no memory, so it reaches
-- the waiters also when Redis is at maxmemory (a stream entry could not be written then).
local function wake(e)
  redis.call('PUBLISH', ekey(e, 'w'), '1')
end

-- The execution's generation for waiters (a store-wide unique number), made if there is
-- none; 0 at maxmemory.  P{E}:g outlives its last waiter's slice by ttl while the
-- execution is empty, and lives on without a TTL while it has checkpoints: a follower
-- busy between two waits must still see a clear then (restart() gives the key a TTL
-- back).  A missing key reads as a new generation, so it may vanish only after a restart.
local RESTART_TTL_MS = 65000
local function generation(e, ttl)
  local gk = ekey(e, 'g')
  local g = redis.call('GET', gk)
  if not g then
    local ok = redis.pcall('HINCRBY', K_STATS, 'generations', 1)
    if type(ok) ~= 'number' then return 0 end
    local set = redis.pcall('SET', gk, ok, 'PX', ttl)
    if set.err then return 0 end
    g = ok
  end
  if redis.call('ZCARD', ekey(e, 'v')) > 0 then
    redis.pcall('PERSIST', gk)
  elseif redis.call('PTTL', gk) < ttl then
    redis.pcall('PEXPIRE', gk, ttl)
  end
  return tonumber(g)
end

-- An execution left empty restarts: versions from 1, and its waiters get a new generation
-- (if none can be made at maxmemory, the key goes: a missing key reads as a new one).
local function restart(e)
  redis.call('DEL', ekey(e, 'hi'))
  local gk = ekey(e, 'g')
  if redis.call('EXISTS', gk) == 1 then
    local ok = redis.pcall('HINCRBY', K_STATS, 'generations', 1)
    if type(ok) ~= 'number' then
      redis.call('DEL', gk)
    elseif redis.call('PTTL', gk) == -1 then
      redis.pcall('SET', gk, ok, 'PX', RESTART_TTL_MS)
    else
      redis.pcall('SET', gk, ok, 'KEEPTTL')
    end
  end
end

-- Drop one record.  resave: the same id is stored in e right after, so an execution
-- left empty keeps its high-water version (no restart).
local function remove(id, e, resave)
  local rk = ekey(e, 'r:' .. id)
  local size = redis.call('HSTRLEN', rk, 's')
  redis.call('DEL', rk)
  redis.call('ZREM', ekey(e, 'v'), id)
  redis.call('HDEL', K_IDS, id)
  redis.call('ZREM', K_ORDER, id)
  redis.call('HINCRBY', K_STATS, 'payload_bytes', -size)
  if redis.call('HINCRBY', K_EXECS, e, -1) <= 0 then
    redis.call('HDEL', K_EXECS, e)
    redis.call('HDEL', K_EBYTES, e)
    if not resave then restart(e) end
  else
    redis.call('HINCRBY', K_EBYTES, e, -size)
  end
  return size
end

-- The Limits in force, as RedisStore wrote them (core/limits.py names the fields; only
-- those set are written, so an absent field is no limit).  No hash: the defaults.
local function limits()
  local flat = redis.call('HGETALL', K_LIMITS)
  if #flat == 0 then
    return {max_checkpoint_bytes = DEFAULT_MAX_CHECKPOINT_BYTES, on_full = 'reject'}
  end
  local L = {}
  for i = 1, #flat, 2 do
    if flat[i] == 'on_full' then L.on_full = flat[i + 1] else L[flat[i]] = tonumber(flat[i + 1]) end
  end
  return L
end

local function over(L, count, nbytes)
  if L.max_checkpoints and count > L.max_checkpoints then
    return 'max_checkpoints', L.max_checkpoints, count
  end
  if L.max_bytes and nbytes > L.max_bytes then return 'max_bytes', L.max_bytes, nbytes end
  return nil
end

local function stored_bytes()
  return tonumber(redis.call('HGET', K_STATS, 'payload_bytes') or '0')
end

-- What storing recs would leave (count, bytes of the store; count, bytes of the batch),
-- accounting for re-saved ids and retention exactly as put() will act.
local function project(recs, keep)
  local count, nbytes = redis.call('HLEN', K_IDS), stored_bytes()
  local batch, gone, members = {}, {}, {}
  local function ids_of(e)
    local ids = members[e]
    if not ids then ids = redis.call('ZRANGE', ekey(e, 'v'), 0, -1); members[e] = ids end
    return ids
  end
  local function take(list, id)
    for i = 1, #list do if list[i] == id then table.remove(list, i); return end end
  end
  for _, r in ipairs(recs) do
    local id, e, size = r[1], r[2], #r[7]
    if batch[id] then
      local old = batch[id]
      batch[id] = nil
      count, nbytes = count - 1, nbytes - old[2]
      if keep then take(ids_of(old[1]), id) end
    elseif not gone[id] then
      local old_e = redis.call('HGET', K_IDS, id)
      if old_e then
        gone[id] = true
        count = count - 1
        nbytes = nbytes - redis.call('HSTRLEN', ekey(old_e, 'r:' .. id), 's')
        if keep then take(ids_of(old_e), id) end
      end
    end
    batch[id] = {e, size}
    count, nbytes = count + 1, nbytes + size
    if keep then
      local ids = ids_of(e)
      ids[#ids + 1] = id
      while #ids > keep do
        local drop = table.remove(ids, 1)
        local dropped
        if batch[drop] then
          dropped = batch[drop][2]
          batch[drop] = nil
        else
          gone[drop] = true
          dropped = redis.call('HSTRLEN', ekey(e, 'r:' .. drop), 's')
        end
        count, nbytes = count - 1, nbytes - dropped
      end
    end
  end
  local bn, bb = 0, 0
  for _, v in pairs(batch) do bn, bb = bn + 1, bb + v[2] end
  return count, nbytes, bn, bb
end

local function refuse(t)
  redis.pcall('HINCRBY', K_STATS, 'rejections', 1)
  t.k = 'full'
  return t
end

-- Check recs against the limits before anything is written: nil and whether eviction
-- must follow, or the refusal.
local function admit(L, recs)
  if L.max_checkpoint_bytes then
    for _, r in ipairs(recs) do
      local size = #r[7] + #r[6]
      if size > L.max_checkpoint_bytes then
        return refuse({limit = 'max_checkpoint_bytes', maximum = num(L.max_checkpoint_bytes),
                       current = num(size), requested = num(size), id = r[1]})
      end
    end
  end
  if L.max_rss then
    local rss = tonumber(string.match(redis.call('INFO', 'memory'), 'used_memory_rss:(%d+)'))
    if rss > L.max_rss then
      return refuse({limit = 'max_rss', maximum = num(L.max_rss), current = num(rss),
                     requested = '0'})
    end
  end
  if not (L.max_bytes or L.max_checkpoints) then return nil, false end
  local count, nbytes, bn, bb = project(recs, L.max_per_execution)
  local name, maximum, value = over(L, count, nbytes)
  if not name then return nil, false end
  local alone = over(L, bn, bb)
  if L.on_full == 'evict' and not alone then return nil, true end
  local now, requested = redis.call('HLEN', K_IDS), bn
  if name == 'max_bytes' then now, requested = stored_bytes(), bb end
  return refuse({limit = name, maximum = num(maximum), current = num(now),
                 requested = num(requested), value = num(value), alone = alone and true or false})
end

local function evict(L)
  local count, nbytes, n = redis.call('HLEN', K_IDS), stored_bytes(), 0
  while over(L, count, nbytes) do
    local oldest = redis.call('ZRANGE', K_ORDER, 0, 0)[1]
    if not oldest then break end
    nbytes = nbytes - remove(oldest, redis.call('HGET', K_IDS, oldest))
    count, n = count - 1, n + 1
  end
  redis.call('HINCRBY', K_STATS, 'evictions', n)
end

-- Store one record (id, e, node, ts, parent or '', meta, state); answer its version.
local function put(L, r)
  local id, e, state = r[1], r[2], r[7]
  local old_e = redis.call('HGET', K_IDS, id)
  if old_e then remove(id, old_e, old_e == e) end
  local version = redis.call('INCR', ekey(e, 'hi'))
  local rk = ekey(e, 'r:' .. id)
  if r[5] == '' then
    redis.call('HSET', rk, 'n', r[3], 'v', version, 't', r[4], 'm', r[6], 's', state)
  else
    redis.call('HSET', rk, 'n', r[3], 'v', version, 't', r[4], 'p', r[5], 'm', r[6], 's', state)
  end
  local vk = ekey(e, 'v')
  redis.call('ZADD', vk, version, id)
  redis.call('HSET', K_IDS, id, e)
  redis.call('ZADD', K_ORDER, redis.call('HINCRBY', K_STATS, 'seq', 1), id)
  redis.call('HINCRBY', K_STATS, 'payload_bytes', #state)
  redis.call('HINCRBY', K_EXECS, e, 1)
  redis.call('HINCRBY', K_EBYTES, e, #state)
  local keep = L.max_per_execution
  if keep then
    local pruned = 0
    while redis.call('ZCARD', vk) > keep do
      remove(redis.call('ZRANGE', vk, 0, 0)[1], e)
      pruned = pruned + 1
    end
    if pruned > 0 then redis.call('HINCRBY', K_STATS, 'pruned', pruned) end
  end
  wake(e)
  return version
end

local function records_from(first, n)
  local recs = {}
  for i = 0, n - 1 do
    local b = first + 7 * i
    recs[#recs + 1] = {ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
                       ARGV[b + 5], ARGV[b + 6]}
  end
  return recs
end

local function drop_lease(e, node, token)
  local lk = ekey(e, 'l:' .. node)
  if redis.call('HGET', lk, 't') ~= token then return false end
  redis.call('DEL', lk)
  wake(e)
  return true
end
