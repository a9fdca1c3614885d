-- clear.lua: remove up to a batch of queued and delayed (not running) flights, answering
-- their waiters with a QueueCleared failure.
-- KEYS[1] queue  KEYS[2] delayed  KEYS[3] running
-- ARGV[4] batch size
-- returns number of flights removed | 'noconfig'
local n = tonumber(ARGV[4])
if redis.call('ZCARD', Q) + redis.call('ZCARD', D) == 0 then return 0 end
if not load_config() then return 'noconfig' end
local removed = 0
for _, set in ipairs({ Q, D }) do
  for _, id in ipairs(redis.call('ZRANGE', set, 0, n - 1)) do
    local fields = flight(id, 'state')
    if fields and not fields[1] then
      redis.call('ZREM', set, id)  -- gone already
    else
      fail(id, 'QueueCleared', 'removed from the queue by clear_queue before it ran')
      removed = removed + 1
    end
  end
end
return removed
