-- init.lua: seed shared config where it is not set yet (Redis wins once set) and register
-- this instance as alive.
-- KEYS[1] config  KEYS[2] instances  KEYS[3] inst:<me>
-- ARGV[4] heartbeat ttl ms  ARGV[5] instance info JSON  ARGV[6..] pairs of field, value
-- returns the config as a flat list
for i = 6, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
local hb = tonumber(ARGV[4])
redis.call('ZADD', I, now_ms() + hb, ME)
redis.call('SET', KEYS[3], ARGV[5], 'PX', hb)
return redis.call('HGETALL', KEYS[1])
