-- init.lua: seed shared config where it is missing or malformed (a valid value is never
-- overwritten: Redis wins once set) and register this instance as alive. Runs at start,
-- and again whenever a script answered 'noconfig' (Redis lost its data: a restart without
-- persistence, a failover, FLUSHDB), with the last shared config this instance saw.
-- KEYS[1] config  KEYS[2] instances  KEYS[3] inst:<me>
-- ARGV[4] heartbeat ttl ms  ARGV[5] instance info JSON  ARGV[6] after a 'noconfig' 0|1
-- ARGV[7..] pairs of field, value
-- returns the shared config (values in config.SHARED_FIELDS order) | 'noconfig'
local kind = redis.call('TYPE', CONFIG).ok
if kind ~= 'hash' then redis.call('DEL', CONFIG) end
local bounds = {}
for _, s in ipairs(SHARED) do bounds[s[1]] = s end
for i = 7, #ARGV, 2 do
  local s = bounds[ARGV[i]]
  if s and setting(redis.call('HGET', CONFIG, ARGV[i]), s[2], s[3], s[4]) == nil then
    redis.call('HSET', CONFIG, ARGV[i], ARGV[i + 1])
  end
end
if not load_config() then return 'noconfig' end
local now = now_ms()
-- The whole config was gone while instances ran: Redis lost its data.
if ARGV[6] == '1' and kind ~= 'hash' then recover(now) end
beat(now, tonumber(ARGV[4]), ARGV[5])
return C_RAW
