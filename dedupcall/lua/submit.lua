-- submit.lua: answer from cache, join the key's flight, or create one (granted at once
-- when a slot is free and nothing more urgent waits).
-- KEYS[1] c:<digest>  KEYS[2] k:<digest>  KEYS[3] f:<new id>  KEYS[4] h:<new id>
-- KEYS[5] held:<me>   KEYS[6] seq  KEYS[7] queue  KEYS[8] running  KEYS[9] config
-- ARGV[4] kind  ARGV[5] digest  ARGV[6] readable key  ARGV[7] new id  ARGV[8] priority
-- ARGV[9] result ttl ms (-1: config)  ARGV[10] cache failures 0|1  ARGV[11] fingerprint
-- ARGV[12] on_conflict raise|join  ARGV[13] payload  ARGV[14] may grant now 0|1
-- A cached success or a flight in progress answers only the same request (its
-- fingerprint: method, URL, body and credential digests) unless on_conflict is 'join'.
-- A repeated submit from the instance that executes the flight (its first reply was
-- lost) gets the grant again, so the flight does not wait for its lease to expire.
-- returns {'cached', id, result} | {'conflict', id} | {'joined', id, state}
--       | {'granted', id, token, attempts, lease ms} | {'queued', id}
local cache_key, active_key, f, h, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind, digest, key, id = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local prio = tonumber(ARGV[8])

local cached = redis.call('GET', cache_key)
if cached then
  local cached_id, cached_fp = string.match(cached, '^(%S+) ?(.*)$')
  local result = redis.call('GET', P .. 'r:' .. cached_id)
  if result then
    if cached_fp ~= ARGV[11] and ARGV[12] ~= 'join' then return { 'conflict', cached_id } end
    return { 'cached', cached_id, result }
  end
  redis.call('DEL', cache_key)
end

local now = now_ms()
local current = redis.call('GET', active_key)
if current then
  local cf = P .. 'f:' .. current
  local state, fprio, fp, exec, token, att = unpack(redis.call('HMGET', cf, 'state', 'prio',
    'fp', 'exec', 'token', 'att'))
  if state then
    if fp ~= ARGV[11] and ARGV[12] ~= 'join' then return { 'conflict', current } end
    if state == 'running' and exec == ME then
      return { 'granted', current, token, tonumber(att), lease_ms() }
    end
    redis.call('SADD', P .. 'h:' .. current, ME)
    redis.call('SADD', held, current)
    if prio > tonumber(fprio) then
      redis.call('HSET', cf, 'prio', prio)
      if state == 'queued' then redis.call('ZADD', Q, score(current), current) end
    end
    return { 'joined', current, state }
  end
  redis.call('DEL', active_key)  -- points at a flight that is gone: self-heal
end

local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', f, 'kind', kind, 'key', key, 'digest', digest, 'prio', prio, 'seq', seq,
  'att', 0, 'ttl', ARGV[9], 'cf', ARGV[10], 'fp', ARGV[11], 'payload', ARGV[13],
  'created', now, 'state', 'queued')
redis.call('SET', active_key, id)
redis.call('SADD', h, ME)
redis.call('SADD', held, id)

local max = cfg('max_concurrent', 100)
local free = max <= 0 or redis.call('ZCARD', R) < max
local head = redis.call('ZRANGE', Q, 0, 0, 'WITHSCORES')
local mine = score(id)
if ARGV[14] == '1' and free and (head[1] == nil or tonumber(head[2]) > mine) then
  local lease = lease_ms()
  local token, att = grant(id, ME, now, lease)
  return { 'granted', id, token, att, lease }
end
redis.call('ZADD', Q, mine, id)
return { 'queued', id }
