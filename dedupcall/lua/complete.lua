-- complete.lua: store an executor's final result if it still holds the lease, release the
-- slot and hand it on.
-- KEYS[1] f:<id>  KEYS[2] r:<id>  KEYS[3] queue  KEYS[4] running  KEYS[5] config
-- ARGV[4] id  ARGV[5] token  ARGV[6] result  ARGV[7] success 0|1
-- ARGV[8] cap ms: it answers later callers for the flight's ttl, capped at this (an HTTP
--         answer's freshness; -1: no cap; 0: never)
-- ARGV[9] keep ms (-1: retention): how long the result can be fetched by id
-- returns {'ok', grants} | {'lost', stored result or false} | {'gone'} | 'noconfig'
local id, token = ARGV[4], ARGV[5]
if not load_config() then return 'noconfig' end
if not owns(id, token) then
  -- Neither record nor result: Redis forgot the flight (it lost data) while this attempt
  -- ran; the executor re-establishes it and completes again (no second run).
  if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then return { 'gone' } end
  return { 'lost', try('GET', KEYS[2]) or false }
end
local fields = flight(id, 'ttl', 'cf')
local ttl_ms = int(fields[1]) or -1
if ttl_ms < 0 then ttl_ms = math.floor(C.result_ttl * 1000) end
local cap = tonumber(ARGV[8])
if cap >= 0 then ttl_ms = math.min(ttl_ms, cap) end
local cacheable = ARGV[7] == '1' or fields[2] == '1'
finish(id, ARGV[6], cacheable and ttl_ms or 0, tonumber(ARGV[9]))
local out = {}
fill(now_ms(), out)
return { 'ok', out }
