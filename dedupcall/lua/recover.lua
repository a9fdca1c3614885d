-- recover.lua: Redis may have lost data (a waiter found its flight gone without a
-- result). With ARGV[4] = '1', pause grants until every live instance has re-established
-- what it runs, at most one lease (see recover in lib.lua); with '0', only report a pause
-- under way (a lost shared config, restored before this runs, starts one).
-- KEYS[1] config
-- ARGV[4] open 0|1
-- returns ms until grants resume (0: no pause) | 'noconfig'
if not load_config() then return 'noconfig' end
local now = now_ms()
if ARGV[4] == '1' then recover(now) end
if not recovering(now) then return 0 end
return C.recover_until - now
