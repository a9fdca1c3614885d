-- leave.lua: this instance's last local waiter left a flight. A function or transport
-- flight that has not started and has no live holder left is dropped; queued requests
-- belong to the queue and stay.
-- KEYS[1] f:<id>  KEYS[2] h:<id>  KEYS[3] held:<me>  KEYS[4] queue  KEYS[5] instances
-- ARGV[4] id
-- returns 'dropped' | 'left'
local id = ARGV[4]
redis.call('SREM', KEYS[2], ME)
redis.call('SREM', KEYS[3], id)
local kind, state = unpack(redis.call('HMGET', KEYS[1], 'kind', 'state'))
if kind and kind ~= 'request' and state ~= 'running' and not has_live_holder(id, now_ms()) then
  fail(id, 'FlightDropped', 'every waiter left before the flight started')
  return 'dropped'
end
return 'left'
