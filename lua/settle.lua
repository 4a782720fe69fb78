-- settle.lua — finish a request that decide.lua admitted, once.
--
-- "refund": the app failed (4xx/5xx) or could not be reached: give every cost back, delete the
--   usage events decide.lua appended and append a refund marker for each, so that the ledger
--   ends up without them even if the control plane already drained them.
-- "commit": a reserved upload (mode "reserve" in decide.lua) finished: give back what was
--   reserved beyond the actual size and append the usage event with the actual amount.
--
-- KEYS[1]          the shard's usage stream
-- KEYS[2]          the request's settle marker: decide.lua writes "d|<taken>|<window start>|
--                  <entry id>|…" (one triple per quota) when it takes costs; settling replaces it
--                  with "s", so a request is settled at most once, and one whose decision never
--                  ran (a timed-out call) gives nothing back. What is given back comes from the
--                  marker, not from the caller.
-- KEYS[3 .. 2+n]   the quota counters decide.lua charged
--
-- ARGV[1] mode    ARGV[2] user   ARGV[3] app   ARGV[4] method   ARGV[5] path   ARGV[6] now (ms)
-- ARGV[7] n
-- then n groups of 3: quota type, event id, actual amount (commit only)
--
-- Returns 1 if it settled now, 0 if there was nothing to settle (never decided, or settled).

local marker = redis.call("GET", KEYS[2])
if not marker or string.sub(marker, 1, 1) ~= "d" then return 0 end
redis.call("SET", KEYS[2], "s", "PX", 86400000)
local recorded = {}
for field in string.gmatch(marker .. "|", "([^|]*)|") do table.insert(recorded, field) end
local mode = ARGV[1]
local user, app, method, path, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = tonumber(ARGV[7])
for i = 1, n do
  local a = 7 + (i - 1) * 3
  local qtype, event = ARGV[a + 1], ARGV[a + 2]
  local taken = tonumber(recorded[2 + (i - 1) * 3] or "0")
  local start = recorded[3 + (i - 1) * 3] or "-1"
  local entry = recorded[4 + (i - 1) * 3] or ""
  local actual = tonumber(ARGV[a + 3] or "0")
  local back = taken
  if mode == "commit" then back = taken - actual end
  local key = KEYS[2 + i]
  -- Give back only into the window that was charged; a new window starts from zero anyway.
  if back > 0 and tonumber(redis.call("HGET", key, "w") or "-1") == tonumber(start) then
    local used = tonumber(redis.call("HGET", key, "u") or "0") - back
    if used < 0 then used = 0 end
    redis.call("HSET", key, "u", string.format("%d", used))
  end
  if mode == "refund" then
    if entry ~= "" then
      redis.call("XDEL", KEYS[1], entry)
      redis.call("XADD", KEYS[1], "*", "k", "refund", "e", event, "u", user, "a", app, "t", qtype)
    end
  elseif actual > 0 then
    redis.call("XADD", KEYS[1], "*", "k", "use", "e", event, "u", user, "a", app,
      "t", qtype, "n", string.format("%d", actual), "m", method, "p", path, "ts", now)
  end
end
return 1
