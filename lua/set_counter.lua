-- set_counter.lua — write a quota counter's used amount for a window, from the control plane.
--
-- Used to rebuild a counter Redis lost (from the ledger; mode "if_missing", so a live counter
-- that sidecars are incrementing is never overwritten) and for an admin's reset of the current
-- window (mode "always", used = 0).
--
-- KEYS[1]  the counter hash (u = used, w = window start ms), see common/src/keys.rs
-- ARGV[1]  used
-- ARGV[2]  window start (ms since the epoch)
-- ARGV[3]  expire at (ms since the epoch); 0 keeps it forever (lifetime quotas)
-- ARGV[4]  "if_missing" or "always"
--
-- Returns 1 if it wrote, 0 if the counter existed and mode was "if_missing".

if ARGV[4] == "if_missing" and redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
redis.call("HSET", KEYS[1], "u", ARGV[1], "w", ARGV[2])
local expire = tonumber(ARGV[3])
if expire > 0 then
  redis.call("PEXPIREAT", KEYS[1], expire)
else
  redis.call("PERSIST", KEYS[1])
end
return 1
