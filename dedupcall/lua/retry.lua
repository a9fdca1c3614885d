-- retry.lua: an attempt failed with a retryable error. Schedule the next attempt in the
-- delayed set (exponential backoff with jitter, at least Retry-After), or fail the flight
-- for good once 1 + max_retries attempts have run.
-- KEYS[1] f:<id>  KEYS[2] r:<id>  KEYS[3] queue  KEYS[4] delayed  KEYS[5] running  KEYS[6] config
-- ARGV[4] id  ARGV[5] token  ARGV[6] final failure result  ARGV[7] jitter in [0,1)
-- ARGV[8] retry-after ms (0: none)
-- returns {'retrying', delay ms, grants} | {'failed', grants} | {'lost', stored result or false}
local id, token = ARGV[4], ARGV[5]
if not owns(id, token) then
  return { 'lost', redis.call('GET', KEYS[2]) }
end
local now = now_ms()
local out = {}
local att = tonumber(redis.call('HGET', KEYS[1], 'att'))
if att > cfg('max_retries', 3) then
  local cf = redis.call('HGET', KEYS[1], 'cf')
  finish(id, ARGV[6], cf == '1', cf == '1' and math.floor(cfg('result_ttl', 3600) * 1000) or 0)
  fill(now, out)
  return { 'failed', out }
end
local base = cfg('retry_delay', 1) * 1000 * 2 ^ (att - 1)
local delay = math.floor(math.min(base / 2 + tonumber(ARGV[7]) * base / 2, 3600000))
delay = math.max(delay, tonumber(ARGV[8]))
redis.call('ZREM', R, id)
redis.call('HSET', KEYS[1], 'state', 'delayed')
redis.call('HDEL', KEYS[1], 'token', 'exec')
redis.call('ZADD', D, now + delay, id)
fill(now, out)
return { 'retrying', delay, out }
