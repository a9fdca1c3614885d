-- retry.lua: an attempt failed with a retryable error. Schedule the next attempt in the
-- delayed set (exponential backoff with jitter, at least Retry-After), or fail the flight
-- for good once 1 + max_retries attempts have run.
-- KEYS[1] f:<id>  KEYS[2] r:<id>  KEYS[3] queue  KEYS[4] delayed  KEYS[5] running  KEYS[6] config
-- ARGV[4] id  ARGV[5] token  ARGV[6] final failure result  ARGV[7] jitter in [0,1)
-- ARGV[8] retry-after ms (0: none)
-- returns {'retrying', delay ms, grants} | {'failed', grants}
--       | {'lost', stored result or false} | {'gone'} | 'noconfig'
local id, token = ARGV[4], ARGV[5]
if not load_config() then return 'noconfig' end
if not owns(id, token) then
  -- Neither record nor result: Redis forgot the flight (it lost data) while this attempt
  -- ran; the executor re-establishes it and completes again (no second run).
  if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then return { 'gone' } end
  return { 'lost', try('GET', KEYS[2]) or false }
end
local now = now_ms()
local out = {}
local fields = flight(id, 'att', 'ttl', 'cf', 'kind')
local att = int(fields[1])
local orphan = fields[4] ~= 'request' and not has_live_holder(id, now)
if att == nil or att > C.max_retries or orphan then
  -- A failure cached after the last attempt lives as long as a success would.
  local ttl_ms = 0
  if fields[3] == '1' then
    ttl_ms = int(fields[2]) or -1
    if ttl_ms < 0 then ttl_ms = math.floor(C.result_ttl * 1000) end
  end
  finish(id, ARGV[6], ttl_ms, -1)
  fill(now, out)
  return { 'failed', out }
end
local base = C.retry_delay * 1000 * 2 ^ math.min(att - 1, 40)
local delay = math.floor(math.min(base / 2 + tonumber(ARGV[7]) * base / 2, 3600000))
delay = math.max(delay, math.min(tonumber(ARGV[8]), 3600000))
redis.call('ZREM', R, id)
redis.call('HSET', KEYS[1], 'state', 'delayed')
redis.call('HDEL', KEYS[1], 'token', 'exec')
redis.call('ZADD', D, now + delay, id)
fill(now, out)
return { 'retrying', delay, out }
