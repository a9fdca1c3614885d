-- retire.lua: this instance stops cleanly. It stops being alive, stops holding flights, and
-- fails the not-yet-running function flights that no live instance can run any more.
-- Queued requests stay: any worker may run them, until their deadline.
-- KEYS[1] instances  KEYS[2] held:<me>  KEYS[3] inst:<me>  KEYS[4] queue  KEYS[5] running
-- returns number of flights failed | 'noconfig'
if not load_config() then return 'noconfig' end
redis.call('ZREM', I, ME)
redis.call('DEL', KEYS[3])
local now = now_ms()
local failed = 0
for _, id in ipairs(try('SMEMBERS', KEYS[2]) or {}) do
  try('SREM', P .. 'h:' .. id, ME)
  local fields = flight(id, 'kind', 'state')
  if fields and KINDS[fields[1]] and fields[1] ~= 'request' and fields[2]
      and fields[2] ~= 'running' and not has_live_holder(id, now) then
    fail(id, 'NoHolder', 'every instance waiting on this flight is gone')
    failed = failed + 1
  end
end
redis.call('DEL', KEYS[2])
local out = {}
fill(now, out)
return failed
