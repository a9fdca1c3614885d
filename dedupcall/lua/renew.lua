-- renew.lua: extend the leases of flights this instance executes.
-- KEYS[1] running  KEYS[2] config
-- ARGV[4..] pairs of id, token
-- returns {lease ms, ids whose lease is lost, ids Redis forgot} | 'noconfig'
-- A flight with neither record nor result was forgotten by Redis (it lost data): the
-- executor re-establishes it (reclaim.lua), and grants pause meanwhile (recover).
-- KEYS[3] recovered (the instances that answered a recovery)
if not load_config() then return 'noconfig' end
local lease = lease_ms()
local now = now_ms()
local lost, gone = {}, {}
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if owns(id, token) then
    redis.call('ZADD', R, now + lease, id)
  elseif redis.call('EXISTS', P .. 'f:' .. id, P .. 'r:' .. id) == 0 then
    gone[#gone + 1] = id
  else
    lost[#lost + 1] = id
  end
end
-- Nothing forgotten: this instance's part of a recovery is done. Otherwise it reports
-- once reclaim.lua has re-established what was forgotten.
if #gone > 0 then recover(now) else report(now) end
return { lease, lost, gone }
