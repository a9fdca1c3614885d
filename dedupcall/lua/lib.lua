-- lib.lua: helpers prepended to every script (scripts.py joins them, after a header it
-- renders from config.py: SHARED, the bounds of each shared setting, and PRIORITY_LIMIT).
-- Every script's ARGV starts with the same three values:
--   ARGV[1] namespace prefix "{ns}:"   ARGV[2] calling instance id
--   ARGV[3] a nonce unique to this call (part of every fencing token granted in it)
-- Dynamic names (a queued flight's hash, a holder's channel) are derived from the prefix:
-- they share its hash tag, so every key a script touches is in the namespace's one slot.
--
-- Records are read defensively: a hand-corrupted field or a key of the wrong type fails
-- (or skips) only the flight it belongs to, typed; a script never aborts on one.
local P = ARGV[1]
local ME = ARGV[2]
local NONCE = ARGV[3]
local Q, D, R, I = P .. 'queue', P .. 'delayed', P .. 'running', P .. 'instances'
local CONFIG = P .. 'config'
local MAX_INT = 9007199254740991
local STATES = { queued = Q, delayed = D, running = R }
local KINDS = { ['function'] = true, request = true, transport = true }

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers travel as plain digits in messages and replies, never as 1e+14.
local function digits(n) return string.format('%d', n) end

-- A command that may meet a hand-corrupted key: its reply, or nil on an error (WRONGTYPE).
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then return nil end
  return reply
end

-- An integer field written as plain digits (as HINCRBY and Python write them), or nil
-- when it is missing or malformed: "1.0", "0x1", " 1" or "1e0" would pass tonumber but
-- make HINCRBY refuse, and abort the script.
local function int(v)
  if type(v) ~= 'string' or #v > 17 or not string.match(v, '^%-?%d+$') then return nil end
  local n = tonumber(v)
  if n > MAX_INT or n < -MAX_INT then return nil end
  return n
end

-- One stored shared setting, by the same rules as config.decode_field: plain digits, at
-- most 16 before and 6 after the point, within its bounds.
local function setting(raw, low, high, integer)
  if type(raw) ~= 'string' then return nil end
  local whole, frac = string.match(raw, '^(%d+)$'), nil
  if not whole then whole, frac = string.match(raw, '^(%d+)%.(%d+)$') end
  if not whole or #whole > 16 or (frac and (integer or #frac > 6)) then return nil end
  local v = tonumber(raw)
  if v < low or v > high then return nil end
  return v
end

-- The shared config, loaded once per script; nil until load_config() succeeds. A script
-- without a complete, valid config refuses to run (returns 'noconfig') rather than
-- enforce defaults: the caller re-seeds it (after Redis lost it) and runs it again.
local C, C_RAW = nil, nil
local function load_config()
  local names = {}
  for i, s in ipairs(SHARED) do names[i] = s[1] end
  names[#names + 1] = 'recover_until'
  names[#names + 1] = 'recover_min'
  local raw = try('HMGET', CONFIG, unpack(names))
  if not raw then return false end
  local c = {}
  for i, s in ipairs(SHARED) do
    local v = setting(raw[i], s[2], s[3], s[4])
    if v == nil then return false end
    c[s[1]] = v
  end
  local until_ms, min_ms = tonumber(raw[#SHARED + 1]), tonumber(raw[#SHARED + 2])
  c.recover_until = (until_ms and until_ms == until_ms) and until_ms or 0
  c.recover_min = (min_ms and min_ms == min_ms) and min_ms or 0
  raw[#SHARED + 1], raw[#SHARED + 2] = nil, nil
  C, C_RAW = c, raw
  return true
end

local function lease_ms() return math.floor(C.lock_timeout * 1000) end
local function retention_ms() return math.floor(C.retention * 1000) end

-- After Redis lost data (a restart without persistence, a failover, FLUSHDB), executors
-- still run flights Redis no longer knows; each re-establishes its own (reclaim.lua), so
-- neither the limit nor once-only is broken by a second run. Grants pause for at least
-- one renewal interval (every executor renews, or heartbeats into a registry Redis may
-- have lost, in that time), then until every live instance has said it re-established
-- what it runs (renew.lua or reclaim.lua add it to REPORTED, after the PUBLISH below
-- reaches it or its own renewal finds a flight gone), and never longer than one lease
-- past the last call: an executor that has not renewed within a lease has lost its lease
-- anyway. Calls during a pause extend it but keep the answers already given.
local REPORTED = P .. 'recovered'
local function recover(now)
  -- A value past one lease is not a pause this code wrote: replaced, not obeyed.
  local under_way = now < C.recover_until and C.recover_until - now <= lease_ms()
  local until_ms = now + lease_ms()
  if not under_way or until_ms > C.recover_until then
    redis.call('HSET', CONFIG, 'recover_until', digits(until_ms))
    C.recover_until = until_ms
  end
  if not under_way then
    C.recover_min = now + math.floor(lease_ms() / 3) + 250
    redis.call('HSET', CONFIG, 'recover_min', digits(C.recover_min))
    redis.call('DEL', REPORTED)
    redis.call('PUBLISH', P .. 'ctl', 'reclaim')
  end
end

-- This instance has re-established (or still owns) everything it runs. Only while a pause
-- is under way (no work otherwise); the set lives no longer than a pause can.
local function report(now)
  if now < C.recover_until then
    try('SADD', REPORTED, ME)
    try('PEXPIRE', REPORTED, lease_ms())
  end
end

-- A pause longer than one lease is not one this code wrote (a hand-written value, a
-- server whose clock went back): ignored, never a namespace stopped.
local function recovering(now)
  if not (now < C.recover_until and C.recover_until - now <= lease_ms()) then
    return false
  end
  if now < C.recover_min then return true end
  local alive = try('ZRANGEBYSCORE', I, '(' .. digits(now), '+inf') or {}
  for _, inst in ipairs(alive) do
    if try('SISMEMBER', REPORTED, inst) ~= 1 then return true end
  end
  return false  -- every live instance has answered: grant again now
end

-- An instance counts as alive for this long after its heartbeat: never less than a lease,
-- so a process whose loop stalls for less than lock_timeout keeps its flights.
local function beat(now, hb, info)
  local window = math.max(hb, lease_ms())
  redis.call('ZADD', I, now + window, ME)
  redis.call('SET', P .. 'inst:' .. ME, info, 'PX', window)
end

local function live(inst, now)
  local s = tonumber(try('ZSCORE', I, inst))
  return s ~= nil and s > now
end

-- Fields of a flight hash (a table, false entries for missing fields); nil when its key
-- holds something else.
local function flight(id, ...)
  return try('HMGET', P .. 'f:' .. id, ...)
end

local function holders(id)
  return try('SMEMBERS', P .. 'h:' .. id) or {}
end

local function has_live_holder(id, now)
  for _, h in ipairs(holders(id)) do
    if live(h, now) then return true end
  end
  return false
end

-- Larger priority first, then FIFO; priority is bounded so the score stays an exact double.
local function score(prio, seq)
  return -prio * 4294967296 + (seq % 4294967296)
end

local function valid_prio(v)
  local p = int(v)
  if p == nil or p > PRIORITY_LIMIT or p < -PRIORITY_LIMIT then return nil end
  return p
end

-- Store the result, index a cacheable success, drop every trace of the flight, wake waiters.
-- cache_ms > 0 makes it answer later callers of its key for that long; keep_ms is how long
-- the result can be fetched by id (-1: the shared retention, at least cache_ms).
local function finish(id, result, cache_ms, keep_ms)
  local f = P .. 'f:' .. id
  local fields = flight(id, 'digest', 'fp', 'cred') or {}
  local digest, fp, cred = fields[1], fields[2], fields[3]
  if keep_ms < 0 then keep_ms = math.max(retention_ms(), cache_ms) end
  redis.call('SET', P .. 'r:' .. id, result, 'PX', math.max(keep_ms, 1))
  if type(digest) == 'string' and digest ~= '' then
    if cache_ms > 0 then
      local entry = id .. ' ' .. (fp or '') .. ' ' .. (cred or '')
      redis.call('SET', P .. 'c:' .. digest, entry, 'PX', cache_ms)
    end
    if try('GET', P .. 'k:' .. digest) == id then
      redis.call('DEL', P .. 'k:' .. digest)
    end
  end
  for _, h in ipairs(holders(id)) do
    try('SREM', P .. 'held:' .. h, id)
  end
  redis.call('DEL', f, P .. 'h:' .. id)
  redis.call('ZREM', Q, id)
  redis.call('ZREM', D, id)
  redis.call('ZREM', R, id)
  -- A small result rides in the notification (saves waiters a GET); big ones never do:
  -- subscribers must stay far below the pub/sub output buffer limit.
  if #result <= 512 then
    redis.call('PUBLISH', P .. 'done', id .. ' ' .. result)
  else
    redis.call('PUBLISH', P .. 'done', id)
  end
end

-- A failure decided inside Redis (no executor produced it): never cached.
local function fail(id, etype, msg)
  local fields = flight(id, 'key', 'kind', 'att') or {}
  local key, kind, att = fields[1], fields[2], fields[3]
  local result = cjson.encode({
    ok = false, id = id, key = type(key) == 'string' and key or '',
    kind = KINDS[kind] and kind or '', att = int(att) or 0,
    err = { type = etype, msg = msg },
  })
  finish(id, result, 0, -1)
end

-- A flight whose record cannot be read fails alone, with an error naming it.
local function quarantine(id, why)
  fail(id, 'MalformedFlight', 'the record of flight ' .. id .. ' in Redis is malformed ('
    .. why .. '); it was failed and removed')
end

-- Put a flight back in the queue; false (and the flight failed) when its record is bad,
-- or when nobody alive holds a function or transport flight any more (its callers left
-- while it ran, or died): queued, it would wait for no one.
local function requeue(id)
  local fields = flight(id, 'prio', 'seq', 'kind')
  if not fields then quarantine(id, 'not a hash'); return false end
  local prio, seq = valid_prio(fields[1]), int(fields[2])
  if prio == nil or seq == nil then quarantine(id, 'prio or seq'); return false end
  if fields[3] ~= 'request' and not has_live_holder(id, now_ms()) then
    fail(id, 'NoHolder', 'every instance waiting on this flight is gone')
    return false
  end
  local f = P .. 'f:' .. id
  redis.call('ZREM', R, id)
  redis.call('ZREM', D, id)
  redis.call('HSET', f, 'state', 'queued')
  redis.call('HDEL', f, 'token', 'exec')
  redis.call('ZADD', Q, score(prio, seq), id)
  return true
end

-- The token is the epoch from INCR (larger for every later grant, for ordering) joined to
-- this call's nonce: unique even when the counter rolls back after Redis lost data.
local GRANTED = 0
local function grant(id, exec, now, lease)
  local epoch = try('INCR', P .. 'epoch')
  if not epoch then
    redis.call('DEL', P .. 'epoch')
    epoch = redis.call('INCR', P .. 'epoch')
  end
  GRANTED = GRANTED + 1
  local token = digits(epoch) .. '.' .. NONCE .. '.' .. GRANTED
  local f = P .. 'f:' .. id
  local att = redis.call('HINCRBY', f, 'att', 1)
  redis.call('HSET', f, 'state', 'running', 'token', token, 'exec', exec, 'started', now)
  redis.call('ZREM', Q, id)
  redis.call('ZREM', D, id)
  redis.call('ZADD', R, now + lease, id)
  return token, att
end

-- Function and transport flights go to the calling instance if it holds them, else to the
-- holder with the freshest heartbeat.
local function pick_holder(id, now)
  local best, best_score = nil, now
  for _, h in ipairs(holders(id)) do
    local s = tonumber(try('ZSCORE', I, h)) or 0
    if h == ME and s > now then return h end
    if s > best_score then best, best_score = h, s end
  end
  return best
end

-- Queued requests go to the calling worker when it is alive (it just freed a slot), else
-- to the freshest one; false when no worker is alive.
local function request_executor(now)
  if live(ME, now) then return ME end
  return redis.call('ZREVRANGEBYSCORE', I, '+inf', now, 'LIMIT', 0, 1)[1] or false
end

local function push_grant(exec, id, token, att, lease, kind, digest, out)
  if exec == ME then
    out[#out + 1] = { id, token, att, lease, kind, digest }
  else
    redis.call('PUBLISH', P .. 'i:' .. exec, 'g ' .. id .. ' ' .. token .. ' ' .. digits(att)
      .. ' ' .. digits(lease) .. ' ' .. kind .. ' ' .. digest)
  end
end

-- Hand free slots to the most urgent queued flights that can run now. Grants for the
-- caller are returned in out; others are pushed to their executor's channel. A queued
-- request with no live worker keeps its place until a worker appears; never claimed by
-- the deadline stamped at its submission (the shared retention), it fails with
-- NoExecutor. A flight whose every holder is gone fails.
local function fill(now, out)
  if recovering(now) then return end
  local max = C.max_concurrent
  local lease = lease_ms()
  local running = redis.call('ZCARD', R)
  local worker = nil  -- the request executor, looked up once
  local skipped = 0
  for _ = 1, 1000 do
    if max > 0 and running >= max then return end
    local id = redis.call('ZRANGE', Q, skipped, skipped)[1]
    if not id or skipped >= 200 then return end
    local fields = flight(id, 'kind', 'digest', 'att', 'deadline')
    local kind, digest, att = fields and fields[1], fields and fields[2], fields and int(fields[3])
    if fields == nil or (not kind and not digest) then
      redis.call('ZREM', Q, id)  -- its hash is gone (or is no hash): self-heal
      if fields == nil then redis.call('DEL', P .. 'f:' .. id) end
    elseif not KINDS[kind] or att == nil or type(digest) ~= 'string' or #digest > 128 then
      quarantine(id, 'kind, digest or att')
    elseif kind == 'request' then
      local deadline = int(fields[4])
      if worker == nil then worker = request_executor(now) end
      if deadline == nil then
        quarantine(id, 'deadline')
      elseif now > deadline and att == 0 then  -- never claimed: once run, it runs again
        fail(id, 'NoExecutor', 'no worker claimed this queued request within the retention '
          .. 'from its submission')
      elseif worker then
        local token, a = grant(id, worker, now, lease)
        push_grant(worker, id, token, a, lease, kind, digest, out)
        running = running + 1
      else
        skipped = skipped + 1
      end
    else
      local exec = pick_holder(id, now)
      if exec then
        local token, a = grant(id, exec, now, lease)
        push_grant(exec, id, token, a, lease, kind, digest, out)
        running = running + 1
      else
        fail(id, 'NoHolder', 'every instance waiting on this flight is gone')
      end
    end
  end
end

-- Checks an executor's lease token; returns true when it still owns the flight.
local function owns(id, token)
  local fields = flight(id, 'state', 'token')
  return fields ~= nil and fields[1] == 'running' and fields[2] == token
end
