-- clear.lua: remove up to a batch of queued and delayed (not running) flights, answering
-- their waiters with a QueueCleared failure.
-- KEYS[1] queue  KEYS[2] delayed  KEYS[3] running
-- ARGV[4] batch size
-- returns number of flights removed
local n = tonumber(ARGV[4])
local removed = 0
for _, set in ipairs({ Q, D }) do
  for _, id in ipairs(redis.call('ZRANGE', set, 0, n - 1)) do
    if redis.call('EXISTS', P .. 'f:' .. id) == 1 then
      fail(id, 'QueueCleared', 'removed from the queue by clear_queue before it ran')
      removed = removed + 1
    else
      redis.call('ZREM', set, id)
    end
  end
end
return removed
