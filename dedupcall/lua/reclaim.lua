-- reclaim.lua: an executor re-establishes flights it runs that Redis forgot (it lost its
-- data), so waiters join the run in progress instead of starting a second one. A flight
-- submitted afresh for the same key meanwhile (not running: grants pause while Redis
-- recovers) is merged into it: its holders move over and its waiters look again.
-- KEYS[1] running  KEYS[2] config  KEYS[3] held:<me>  KEYS[4] recovered
-- ARGV[4..] groups of 11: id, token, kind, digest, readable key, attempts, priority,
--           ttl ms, cache failures 0|1, fingerprint, credential digest, payload (12 values)
-- returns ids that could not be re-established (another run owns the key) | 'noconfig'
if not load_config() then return 'noconfig' end
local now = now_ms()
local lease = lease_ms()
local lost = {}
for i = 4, #ARGV, 12 do
  local id, token, kind, digest = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local f = P .. 'f:' .. id
  local other = try('GET', P .. 'k:' .. digest)
  local fields = type(other) == 'string' and other ~= id and flight(other, 'state') or nil
  if redis.call('EXISTS', f, P .. 'r:' .. id) > 0 or (fields and fields[1] == 'running')
      or not KINDS[kind] then
    lost[#lost + 1] = id
  else
    if fields and fields[1] then  -- a fresh flight of the same key, not running: merge it
      for _, h in ipairs(holders(other)) do
        redis.call('SADD', P .. 'h:' .. id, h)
        try('SREM', P .. 'held:' .. h, other)
        try('SADD', P .. 'held:' .. h, id)
      end
      redis.call('DEL', P .. 'f:' .. other, P .. 'h:' .. other)
      redis.call('ZREM', Q, other)
      redis.call('ZREM', D, other)
      -- Its waiters follow this record to the run in progress.
      local moved = cjson.encode({ ok = false, id = other, key = ARGV[i + 4], kind = kind,
        att = 0, data = { moved_to = id }, err = { type = 'Moved', msg = 'merged into flight '
          .. id .. ', which Redis had lost and its executor re-established' } })
      redis.call('SET', P .. 'r:' .. other, moved, 'PX', retention_ms())
      redis.call('PUBLISH', P .. 'done', other .. ' ' .. moved)
    end
    local seq = try('INCR', P .. 'seq') or 0
    local deadline = kind == 'request' and digits(now + retention_ms()) or ''
    redis.call('HSET', f, 'kind', kind, 'key', ARGV[i + 4], 'digest', digest,
      'prio', ARGV[i + 6], 'seq', seq, 'att', ARGV[i + 5], 'ttl', ARGV[i + 7],
      'cf', ARGV[i + 8], 'fp', ARGV[i + 9], 'cred', ARGV[i + 10], 'payload', ARGV[i + 11],
      'created', now, 'deadline', deadline, 'state', 'running', 'token', token,
      'exec', ME, 'started', now)
    redis.call('SET', P .. 'k:' .. digest, id)
    redis.call('SADD', P .. 'h:' .. id, ME)
    try('SADD', KEYS[3], id)
    redis.call('ZADD', R, now + lease, id)
  end
end
report(now)  -- with no flights at all: an instance that runs nothing answering a recovery
return lost
