-- leave.lua: this instance's last local waiter left a flight. A function or transport
-- flight that has not started and has no live holder left is dropped; queued requests
-- belong to the queue and stay.
-- KEYS[1] f:<id>  KEYS[2] h:<id>  KEYS[3] held:<me>  KEYS[4] queue  KEYS[5] instances
-- ARGV[4] id
-- returns 'dropped' | 'left' | 'noconfig'
local id = ARGV[4]
if not load_config() then return 'noconfig' end
try('SREM', KEYS[2], ME)
try('SREM', KEYS[3], id)
local fields = flight(id, 'kind', 'state')
if fields and KINDS[fields[1]] and fields[1] ~= 'request' and fields[2] ~= 'running'
    and not has_live_holder(id, now_ms()) then
  fail(id, 'FlightDropped', 'every waiter left before the flight started')
  return 'dropped'
end
return 'left'
