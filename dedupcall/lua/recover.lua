-- recover.lua: a waiter found its flight gone without a result: Redis lost data. Grants
-- pause for one renewal interval while executors re-establish what they run (see
-- recover in lib.lua); the caller waits that long before it submits again.
-- KEYS[1] config
-- returns ms until grants resume | 'noconfig'
if not load_config() then return 'noconfig' end
local now = now_ms()
recover(now)
return C.recover_until - now
