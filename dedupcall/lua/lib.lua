-- lib.lua: helpers prepended to every script (scripts.py joins them), not a script itself.
-- Every script's ARGV starts with the same three values:
--   ARGV[1] namespace prefix "{ns}:"   ARGV[2] calling instance id   ARGV[3] retention ms
-- Dynamic names (a queued flight's hash, a holder's channel) are derived from the prefix:
-- they share its hash tag, so every key a script touches is in the namespace's one slot.
local P = ARGV[1]
local ME = ARGV[2]
local RETENTION = tonumber(ARGV[3])
local Q, D, R, I = P .. 'queue', P .. 'delayed', P .. 'running', P .. 'instances'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function cfg(name, default)
  local v = tonumber(redis.call('HGET', P .. 'config', name))
  if v == nil then return default end
  return v
end

local function lease_ms() return math.floor(cfg('lock_timeout', 30) * 1000) end

-- Larger priority first, then FIFO; priority is bounded so the score stays an exact double.
local function score(id)
  local prio, seq = unpack(redis.call('HMGET', P .. 'f:' .. id, 'prio', 'seq'))
  return -tonumber(prio) * 4294967296 + (tonumber(seq) % 4294967296)
end

local function live(inst, now)
  local s = redis.call('ZSCORE', I, inst)
  return s ~= false and tonumber(s) > now
end

local function has_live_holder(id, now)
  for _, h in ipairs(redis.call('SMEMBERS', P .. 'h:' .. id)) do
    if live(h, now) then return true end
  end
  return false
end

-- Queued requests go to the calling worker when it is alive (it just freed a slot),
-- else to the freshest worker; function and transport flights to the calling instance if
-- it holds them, else to the holder with the freshest heartbeat (a holder that died a
-- moment ago still looks alive until its heartbeat expires, but it beat last long ago).
local function pick_executor(id, kind, now)
  if kind == 'request' then
    if live(ME, now) then return ME end
    return redis.call('ZREVRANGEBYSCORE', I, '+inf', now, 'LIMIT', 0, 1)[1]
  end
  local best, best_score = nil, now
  for _, h in ipairs(redis.call('SMEMBERS', P .. 'h:' .. id)) do
    local s = tonumber(redis.call('ZSCORE', I, h) or 0)
    if h == ME and s > now then return h end
    if s > best_score then best, best_score = h, s end
  end
  return best
end

-- Store the result, index a cacheable success, drop every trace of the flight, wake waiters.
local function finish(id, result, cacheable, ttl_ms)
  local f = P .. 'f:' .. id
  local digest, fp = unpack(redis.call('HMGET', f, 'digest', 'fp'))
  redis.call('SET', P .. 'r:' .. id, result, 'PX', math.max(RETENTION, ttl_ms, 1))
  if digest then
    if cacheable and ttl_ms > 0 then
      redis.call('SET', P .. 'c:' .. digest, id .. ' ' .. (fp or ''), 'PX', ttl_ms)
    end
    if redis.call('GET', P .. 'k:' .. digest) == id then
      redis.call('DEL', P .. 'k:' .. digest)
    end
  end
  for _, h in ipairs(redis.call('SMEMBERS', P .. 'h:' .. id)) do
    redis.call('SREM', P .. 'held:' .. h, id)
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
  local f = P .. 'f:' .. id
  local key, kind, att = unpack(redis.call('HMGET', f, 'key', 'kind', 'att'))
  local result = cjson.encode({
    ok = false, id = id, key = key or '', kind = kind or '',
    att = tonumber(att) or 0, err = { type = etype, msg = msg },
  })
  finish(id, result, false, 0)
end

local function requeue(id)
  local f = P .. 'f:' .. id
  redis.call('ZREM', R, id)
  redis.call('ZREM', D, id)
  redis.call('HSET', f, 'state', 'queued')
  redis.call('HDEL', f, 'token', 'exec')
  redis.call('ZADD', Q, score(id), id)
end

-- The epoch from INCR is the lease token: unique, and larger for every later grant (fencing).
local function grant(id, exec, now, lease)
  local f = P .. 'f:' .. id
  local token = tostring(redis.call('INCR', P .. 'epoch'))
  local att = redis.call('HINCRBY', f, 'att', 1)
  redis.call('HSET', f, 'state', 'running', 'token', token, 'exec', exec, 'started', now)
  redis.call('ZREM', Q, id)
  redis.call('ZADD', R, now + lease, id)
  return token, att
end

-- Hand free slots to the most urgent queued flights. Grants for the caller are returned;
-- others are pushed to their executor's channel.
local function fill(now, out)
  local max = cfg('max_concurrent', 100)
  local lease = lease_ms()
  for _ = 1, 1000 do
    if max > 0 and redis.call('ZCARD', R) >= max then return end
    local id = redis.call('ZRANGE', Q, 0, 0)[1]
    if not id then return end
    local kind, digest = unpack(redis.call('HMGET', P .. 'f:' .. id, 'kind', 'digest'))
    if not kind then
      redis.call('ZREM', Q, id)  -- its hash is gone: self-heal
    else
      local exec = pick_executor(id, kind, now)
      if exec then
        local token, att = grant(id, exec, now, lease)
        if exec == ME then
          out[#out + 1] = { id, token, att, lease, kind, digest or '' }
        else
          redis.call('PUBLISH', P .. 'i:' .. exec, 'g ' .. id .. ' ' .. token .. ' ' .. att
            .. ' ' .. lease .. ' ' .. kind .. ' ' .. (digest or ''))
        end
      else
        fail(id, 'NoExecutor', 'every instance that could run this flight is gone')
      end
    end
  end
end

-- Checks an executor's lease token; returns true when it still owns the flight.
local function owns(id, token)
  local state, tok = unpack(redis.call('HMGET', P .. 'f:' .. id, 'state', 'token'))
  return state == 'running' and tok == token
end
