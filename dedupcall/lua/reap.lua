-- reap.lua: the worker's sweep. Heartbeat this instance; requeue flights whose lease
-- expired (or fail them once their attempts are spent); drop dead instances as holders and
-- fail flights nobody alive can run; promote due retries; grant free slots.
-- KEYS[1] queue  KEYS[2] delayed  KEYS[3] running  KEYS[4] instances  KEYS[5] config
-- KEYS[6] inst:<me>
-- ARGV[4] heartbeat ttl ms  ARGV[5] instance info JSON  ARGV[6] list my running grants 0|1
-- ARGV[7] steady 0|1: this instance's recent sweeps all succeeded, on time
-- returns {grants, ms to next retry or -1, ms to next lease expiry or -1, my grants,
--          shared config (values in config.SHARED_FIELDS order), flights reaped}
--       | 'noconfig'
if not load_config() then return 'noconfig' end
local now = now_ms()
local hb = tonumber(ARGV[4])
-- Declare no lease expired and no instance dead right after a gap in our own heartbeats
-- (Redis refused writes, paused, restarted; a slow link): whatever silenced us silenced
-- them too. One beat later, what really stopped is still stopped.
local prev = tonumber(try('ZSCORE', I, ME))
local steady = ARGV[7] == '1' and prev ~= nil and prev > now
local steady_leases, steady_instances = steady, steady
beat(now, hb, ARGV[5])
local reaped = 0

local expired = {}
if steady_leases then
  expired = redis.call('ZRANGEBYSCORE', R, '-inf', now, 'LIMIT', 0, 500)
end
for _, id in ipairs(expired) do
  local fields = flight(id, 'att', 'state', 'kind')
  reaped = reaped + 1
  if fields == nil then
    quarantine(id, 'not a hash')
  elseif fields[2] ~= 'running' then
    redis.call('ZREM', R, id)  -- gone, or not running: not a lease any more
    local exists = fields[1] or fields[2] or fields[3]
    if exists and fields[2] ~= 'queued' and fields[2] ~= 'delayed' then
      quarantine(id, 'state')
    end
  elseif int(fields[1]) == nil then
    quarantine(id, 'att')
  elseif int(fields[1]) > C.max_retries then
    fail(id, 'LeaseExpired', 'the executor stopped answering past its lease on every attempt')
  else
    requeue(id)
  end
end

local dead_ones = {}
if steady_instances then
  dead_ones = redis.call('ZRANGEBYSCORE', I, '-inf', now, 'LIMIT', 0, 100)
end
for _, dead in ipairs(dead_ones) do
  for _, id in ipairs(try('SMEMBERS', P .. 'held:' .. dead) or {}) do
    try('SREM', P .. 'h:' .. id, dead)
    local fields = flight(id, 'kind', 'state')
    if fields and KINDS[fields[1]] and fields[1] ~= 'request' and fields[2] ~= 'running'
        and fields[2] and not has_live_holder(id, now) then
      fail(id, 'NoHolder', 'every instance waiting on this flight is gone')
      reaped = reaped + 1
    end
  end
  redis.call('DEL', P .. 'held:' .. dead, P .. 'inst:' .. dead)
  redis.call('ZREM', I, dead)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', D, '-inf', now, 'LIMIT', 0, 500)) do
  local fields = flight(id, 'state')
  if fields and fields[1] == 'delayed' then
    requeue(id)
  elseif fields and fields[1] and STATES[fields[1]] then
    redis.call('ZREM', D, id)  -- queued or running elsewhere: a stale entry
  elseif fields and not fields[1] then
    redis.call('ZREM', D, id)  -- gone
  else
    quarantine(id, 'state')
  end
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
  local lease = lease_ms()
  for _, id in ipairs(redis.call('ZRANGE', R, 0, -1)) do
    local fields = flight(id, 'exec', 'token', 'att', 'kind', 'digest')
    local att = fields and int(fields[3])
    if fields and fields[1] == ME and att and type(fields[2]) == 'string' and fields[2] ~= ''
        and KINDS[fields[4]] and type(fields[5]) == 'string' then
      mine[#mine + 1] = { id, fields[2], att, lease, fields[4], fields[5] }
    end
  end
end
-- Leases are not reaped until steady: wake at the next heartbeat, not at once.
return { out, next_in(D), steady_leases and next_in(R) or -1, mine, C_RAW, reaped }
