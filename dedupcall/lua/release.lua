-- release.lua: an executor gives a granted flight back without a result (it is shutting
-- down, or no local caller holds the function any more). The flight is requeued at once
-- with this attempt uncounted; with drop 1 this instance also stops holding it.
-- KEYS[1] f:<id>  KEYS[2] held:<me>  KEYS[3] queue  KEYS[4] running  KEYS[5] config
-- ARGV[4] id  ARGV[5] token  ARGV[6] drop 0|1
-- returns {'released', grants} | {'lost'} | 'noconfig'
local id, token = ARGV[4], ARGV[5]
if not load_config() then return 'noconfig' end
if not owns(id, token) then return { 'lost' } end
local att = int(flight(id, 'att')[1])
if att == nil then
  quarantine(id, 'att')
else
  redis.call('HSET', KEYS[1], 'att', math.max(att - 1, 0))
  if ARGV[6] == '1' then
    try('SREM', P .. 'h:' .. id, ME)
    try('SREM', KEYS[2], id)
  end
  requeue(id)
end
local out = {}
fill(now_ms(), out)
return { 'released', out }
