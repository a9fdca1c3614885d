-- renew.lua: extend the leases of flights this instance executes.
-- KEYS[1] running  KEYS[2] config
-- ARGV[4..] pairs of id, token
-- returns {lease ms, ids whose lease is lost} | 'noconfig'
if not load_config() then return 'noconfig' end
local lease = lease_ms()
local now = now_ms()
local lost = {}
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if owns(id, token) then
    redis.call('ZADD', R, now + lease, id)
  else
    lost[#lost + 1] = id
  end
end
return { lease, lost }
