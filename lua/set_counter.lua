-- set_counter.lua — write a quota counter's used amount for a window, from the control plane.
--
-- Used for an admin's reset of the current window (mode "always", used = 0). Rebuilding lost
-- counters goes through sync_user.lua.
--
-- KEYS[1]  the user's hash (common/src/keys.rs)
-- ARGV[1]  the quota's counter field   ARGV[2] used   ARGV[3] window start (ms since the epoch)
--
-- Returns what the counter held for that window before (0 if it held another window or nothing).

local before = 0
local counter = redis.call("HGET", KEYS[1], ARGV[1])
if counter then
  local sep = string.find(counter, "|", 1, true)
  if string.sub(counter, sep + 1) == ARGV[3] then
    before = tonumber(string.sub(counter, 1, sep - 1))
  end
end
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2] .. "|" .. ARGV[3])
return before
