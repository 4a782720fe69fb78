-- reserve.lua — take another step of quota for an upload of unknown length while it streams.
--
-- decide.lua reserved a first step (mode "reserve"); as the body passes what is reserved, the
-- sidecar asks for more here, never beyond the quota, so a user's concurrent uploads share what
-- remains instead of the first one holding all of it. What is reserved is recorded in the marker,
-- so settle.lua commits the real size (or refunds it all) exactly once.
--
-- KEYS[1]  the user's hash (common/src/keys.rs)
-- KEYS[2]  the request's settle marker ("<taken>|<window start>|reserve")
--
-- ARGV[1] the quota's limit field   ARGV[2] its counter field   ARGV[3] the most to take now
-- ARGV[4] the marker's time to live (ms)
--
-- Returns what it took now (0: nothing remains, the window changed, or the request is settled).

local marker = redis.call("GET", KEYS[2])
if not marker or marker == "x" then return 0 end
local p1 = string.find(marker, "|", 1, true)
local p2 = string.find(marker, "|", p1 + 1, true)
local taken = tonumber(string.sub(marker, 1, p1 - 1))
local start = string.sub(marker, p1 + 1, p2 - 1)
if string.sub(marker, p2 + 1) ~= "reserve" then return 0 end

local got = redis.call("HMGET", KEYS[1], ARGV[1], ARGV[2])
if not got[1] then return 0 end
local limit = tonumber(string.sub(got[1], 1, string.find(got[1], "|", 1, true) - 1))
local used = 0
if got[2] then
  local sep = string.find(got[2], "|", 1, true)
  -- The window rolled over since the upload began: its first window's quota is all it gets.
  if string.sub(got[2], sep + 1) ~= start then return 0 end
  used = tonumber(string.sub(got[2], 1, sep - 1))
end
local take = tonumber(ARGV[3])
if limit - used < take then take = limit - used end
if take < 1 then return 0 end
redis.call("HSET", KEYS[1], ARGV[2], string.format("%d", used + take) .. "|" .. start)
redis.call("SET", KEYS[2], string.format("%d", taken + take) .. "|" .. start .. "|reserve", "PX", ARGV[4])
return take
