-- settle.lua — finish a request that decide.lua admitted, once.
--
-- "refund": the app failed (4xx/5xx), could not be reached, or the client cut the body off: give
--   the cost back to the counter and take it (and the call) out of the usage bucket it was added
--   to. If the bucket was drained meanwhile, the subtraction starts a new bucket for that minute,
--   which the drain adds to the ledger in turn.
-- "commit": a reserved upload (mode "reserve" in decide.lua) finished: give back what was
--   reserved beyond the actual size and add the actual size and the call to the bucket.
--
-- What is given back comes from the marker decide.lua wrote ("<taken>|<window start>|<mode>"),
-- never from the caller; settling deletes the marker, so a request is settled at most once. A
-- refund that finds no marker (the decision never ran, has not run yet, or was settled) leaves a
-- tombstone "x" for the marker's time to live, so that a decision still on its way is cancelled
-- (decide.lua writes its marker with SET NX) instead of charging a request given up on.
--
-- KEYS[1]   the user's hash (the counter field ARGV[2] is in it)
-- KEYS[2]   the request's settle marker
-- KEYS[3]   the usage bucket of the decision's minute
--
-- ARGV[1] mode ("refund" or "commit")   ARGV[2] the quota's counter field   ARGV[3] user id
-- ARGV[4] the bucket field suffix "<app>|<type>|<route>"   ARGV[5] actual amount (commit)
-- ARGV[6] the tombstone's time to live (ms)
--
-- Returns 1 if it settled now, 0 if there was nothing to settle.

local mode = ARGV[1]
local marker = redis.call("GET", KEYS[2])
if not marker then
  if mode == "refund" then redis.call("SET", KEYS[2], "x", "PX", ARGV[6]) end
  return 0
end
if marker == "x" then return 0 end
redis.call("DEL", KEYS[2])

local p1 = string.find(marker, "|", 1, true)
local p2 = string.find(marker, "|", p1 + 1, true)
local taken = tonumber(string.sub(marker, 1, p1 - 1))
local start = string.sub(marker, p1 + 1, p2 - 1)
local decided = string.sub(marker, p2 + 1)
local actual = tonumber(ARGV[5])
local back = taken
if mode == "commit" then back = taken - actual end

-- Give back only into the window that was charged; a new window starts from zero anyway.
if back ~= 0 then
  local counter = redis.call("HGET", KEYS[1], ARGV[2])
  if counter then
    local sep = string.find(counter, "|", 1, true)
    if string.sub(counter, sep + 1) == start then
      local used = tonumber(string.sub(counter, 1, sep - 1)) - back
      if used < 0 then used = 0 end
      redis.call("HSET", KEYS[1], ARGV[2], string.format("%d", used) .. "|" .. start)
    end
  end
end

local suffix = ARGV[3] .. "|" .. ARGV[4]
if mode == "refund" and decided ~= "reserve" then
  if taken > 0 then redis.call("HINCRBY", KEYS[3], "a:" .. suffix, -taken) end
  redis.call("HINCRBY", KEYS[3], "n:" .. suffix, -1)
elseif mode == "commit" and decided == "reserve" then
  if actual > 0 then redis.call("HINCRBY", KEYS[3], "a:" .. suffix, actual) end
  redis.call("HINCRBY", KEYS[3], "n:" .. suffix, 1)
end
return 1
