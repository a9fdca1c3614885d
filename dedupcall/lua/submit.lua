-- submit.lua: answer from cache, join the key's flight, or create one (granted at once
-- when a slot is free and nothing more urgent waits).
-- KEYS[1] c:<digest>  KEYS[2] k:<digest>  KEYS[3] f:<new id>  KEYS[4] h:<new id>
-- KEYS[5] held:<me>   KEYS[6] seq  KEYS[7] queue  KEYS[8] running  KEYS[9] config
-- ARGV[4] kind  ARGV[5] digest  ARGV[6] readable key  ARGV[7] new id  ARGV[8] priority
-- ARGV[9] result ttl ms (-1: config)  ARGV[10] cache failures 0|1  ARGV[11] fingerprint
-- ARGV[12] credential digest  ARGV[13] on_conflict raise|join  ARGV[14] payload
-- ARGV[15] may grant now 0|1  ARGV[16] fresh 0|1: refuses a stored answer (its
-- Cache-Control says no-cache, no-store or max-age=0): a flight in progress still answers
-- A cached success or a flight in progress answers only the same request (its
-- fingerprint: method, URL, body) unless on_conflict is 'join', and never a request with
-- other credentials. A repeated submit from the instance that executes the flight (its
-- first reply was lost) gets the grant again, so the flight does not wait for its lease.
-- returns {'cached', id, result} | {'conflict', id, 'credentials'|'request'} | {'joined', id, state}
--       | {'granted', id, token, attempts, lease ms} | {'queued', id, grants} | 'noconfig'
local cache_key, active_key, f, h, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind, digest, key, id = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local prio = tonumber(ARGV[8])
local fp, cred, join = ARGV[11], ARGV[12], ARGV[13] == 'join'

-- 'credentials', 'request' or nil: why another request's answer is not this one's.
local function conflicts(other_fp, other_cred)
  if other_cred ~= cred then return 'credentials' end
  if other_fp ~= fp and not join then return 'request' end
  return nil
end

local cached = ARGV[16] ~= '1' and try('GET', cache_key)
if type(cached) == 'string' then
  local cached_id, cached_fp, cached_cred = string.match(cached, '^(%S+) (%S*) (%S*)$')
  local result = cached_id and try('GET', P .. 'r:' .. cached_id)
  if type(result) == 'string' then
    local why = conflicts(cached_fp, cached_cred)
    if why then return { 'conflict', cached_id, why } end
    return { 'cached', cached_id, result }
  end
end
if cached ~= false then redis.call('DEL', cache_key) end  -- expired result, or malformed
if ARGV[16] == '1' then redis.call('DEL', cache_key) end  -- a fresh answer replaces it

if not load_config() then return 'noconfig' end
local now = now_ms()
local current = try('GET', active_key)
if type(current) == 'string' then
  local fields = flight(current, 'state', 'prio', 'fp', 'cred', 'exec', 'token', 'att')
  local state = fields and fields[1]
  local fprio, att = fields and valid_prio(fields[2]), fields and int(fields[7])
  if state and STATES[state] and fprio ~= nil and att ~= nil then
    local why = conflicts(fields[3] or '', fields[4] or '')
    if why then return { 'conflict', current, why } end
    if state == 'running' and fields[5] == ME then
      return { 'granted', current, fields[6], att, lease_ms() }
    end
    -- Self-heal a flight that fell out of its set (a hand-edited record): put it back.
    if not try('ZSCORE', STATES[state], current) then
      if state == 'running' then
        redis.call('ZADD', R, now + lease_ms(), current)
      elseif not requeue(current) then
        current = nil
      end
    end
    if current then
      -- Side records of the wrong type (hand-edited) are rebuilt, never fatal.
      if not try('SADD', P .. 'h:' .. current, ME) then
        redis.call('DEL', P .. 'h:' .. current)
        redis.call('SADD', P .. 'h:' .. current, ME)
      end
      if not try('SADD', held, current) then
        redis.call('DEL', held)
        redis.call('SADD', held, current)
      end
      if prio > fprio then
        redis.call('HSET', P .. 'f:' .. current, 'prio', prio)
        if state == 'queued' then requeue(current) end
      end
      return { 'joined', current, state }
    end
  elseif fields == nil or state then
    quarantine(current, 'state, prio or att')
  elseif redis.call('EXISTS', P .. 'r:' .. current) == 0 then
    -- The key's flight is gone without a result: Redis lost data (a failover that missed
    -- writes, a record deleted by hand). Its executor may still run it: pause grants
    -- while it re-establishes the run, which this new flight then joins.
    recover(now)
  end
end
if current ~= false then redis.call('DEL', active_key) end  -- points at no flight: self-heal

local seq = try('INCR', KEYS[6])
if not seq then
  redis.call('DEL', KEYS[6])
  seq = redis.call('INCR', KEYS[6])
end
redis.call('DEL', f, h)  -- a new id: anything there is debris
local deadline = kind == 'request' and digits(now + retention_ms()) or ''
redis.call('HSET', f, 'kind', kind, 'key', key, 'digest', digest, 'prio', prio, 'seq', seq,
  'att', 0, 'ttl', ARGV[9], 'cf', ARGV[10], 'fp', fp, 'cred', cred, 'payload', ARGV[14],
  'created', now, 'deadline', deadline, 'state', 'queued')
redis.call('SET', active_key, id)
redis.call('SADD', h, ME)  -- h was deleted above: a set
if not try('SADD', held, id) then
  redis.call('DEL', held)
  redis.call('SADD', held, id)
end

local max = C.max_concurrent
local free = (max <= 0 or redis.call('ZCARD', R) < max) and not recovering(now)
local mine = score(prio, seq)
if ARGV[15] ~= '1' or not free then
  redis.call('ZADD', Q, mine, id)
  return { 'queued', id, {} }
end
local head = redis.call('ZRANGE', Q, 0, 0, 'WITHSCORES')
if head[1] == nil or tonumber(head[2]) > mine then
  local lease = lease_ms()
  local token, att = grant(id, ME, now, lease)
  return { 'granted', id, token, att, lease }
end
-- A slot is free but something more urgent is queued (a request waiting for a worker,
-- or a grant not handed out yet): hand out what can run, ours included.
redis.call('ZADD', Q, mine, id)
local out = {}
fill(now, out)
return { 'queued', id, out }
