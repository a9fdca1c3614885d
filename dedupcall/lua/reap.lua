-- reap.lua: the worker's sweep. Heartbeat this instance; requeue flights whose lease
-- expired (or fail them once their attempts are spent); drop dead instances as holders and
-- fail flights nobody alive can run; promote due retries; grant free slots.
-- KEYS[1] queue  KEYS[2] delayed  KEYS[3] running  KEYS[4] instances  KEYS[5] config
-- KEYS[6] inst:<me>
-- ARGV[4] heartbeat ttl ms  ARGV[5] instance info JSON  ARGV[6] list my running grants 0|1
-- returns {grants, ms to next retry or -1, ms to next lease expiry or -1, my grants,
--          config as a flat list, number of flights reaped}
local now = now_ms()
local hb = tonumber(ARGV[4])
redis.call('ZADD', I, now + hb, ME)
redis.call('SET', KEYS[6], ARGV[5], 'PX', hb)
local reaped = 0

local max_retries = cfg('max_retries', 3)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', R, '-inf', now, 'LIMIT', 0, 500)) do
  local att = redis.call('HGET', P .. 'f:' .. id, 'att')
  reaped = reaped + 1
  if not att then
    redis.call('ZREM', R, id)
  elseif tonumber(att) > max_retries then
    fail(id, 'LeaseExpired', 'the executor stopped answering past its lease on every attempt')
  else
    requeue(id)
  end
end

for _, dead in ipairs(redis.call('ZRANGEBYSCORE', I, '-inf', now, 'LIMIT', 0, 100)) do
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. dead)) do
    redis.call('SREM', P .. 'h:' .. id, dead)
    local kind, state = unpack(redis.call('HMGET', P .. 'f:' .. id, 'kind', 'state'))
    if kind and kind ~= 'request' and state ~= 'running' and not has_live_holder(id, now) then
      fail(id, 'NoHolder', 'every instance waiting on this flight is gone')
      reaped = reaped + 1
    end
  end
  redis.call('DEL', P .. 'held:' .. dead, P .. 'inst:' .. dead)
  redis.call('ZREM', I, dead)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', D, '-inf', now, 'LIMIT', 0, 500)) do
  if redis.call('EXISTS', P .. 'f:' .. id) == 1 then requeue(id) else redis.call('ZREM', D, id) end
end

local out = {}
fill(now, out)

local function next_in(set)
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if first[1] == nil then return -1 end
  return math.max(0, tonumber(first[2]) - now)
end

local mine = {}
if ARGV[6] == '1' then
  for _, id in ipairs(redis.call('ZRANGE', R, 0, -1)) do
    local exec, token, att, kind, digest = unpack(redis.call('HMGET', P .. 'f:' .. id,
      'exec', 'token', 'att', 'kind', 'digest'))
    if exec == ME then
      mine[#mine + 1] = { id, token, tonumber(att), lease_ms(), kind, digest or '' }
    end
  end
end
return { out, next_in(D), next_in(R), mine, redis.call('HGETALL', P .. 'config'), reaped }
