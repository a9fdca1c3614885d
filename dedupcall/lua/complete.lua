-- complete.lua: store an executor's final result if it still holds the lease, release the
-- slot and hand it on.
-- KEYS[1] f:<id>  KEYS[2] r:<id>  KEYS[3] queue  KEYS[4] running  KEYS[5] config
-- ARGV[4] id  ARGV[5] token  ARGV[6] result  ARGV[7] success 0|1  ARGV[8] ttl ms (-1: flight's)
-- returns {'ok', grants} | {'lost', stored result or false}
local id, token = ARGV[4], ARGV[5]
if not owns(id, token) then
  return { 'lost', redis.call('GET', KEYS[2]) }
end
local ttl, cf = unpack(redis.call('HMGET', KEYS[1], 'ttl', 'cf'))
local ttl_ms = tonumber(ARGV[8])
if ttl_ms < 0 then ttl_ms = tonumber(ttl) or -1 end
if ttl_ms < 0 then ttl_ms = math.floor(cfg('result_ttl', 3600) * 1000) end
local ok = ARGV[7] == '1'
finish(id, ARGV[6], ok or cf == '1', ttl_ms)
local out = {}
fill(now_ms(), out)
return { 'ok', out }
