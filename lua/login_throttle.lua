-- login_throttle.lua — failed-login counters for one account and one client address.
--
-- KEYS[1]  failures of the account   ({login}-tagged, see common/src/keys.rs)
-- KEYS[2]  failures of the client address
-- ARGV[1]  "check" (is either locked?) or "fail" (count one failure, then check)
-- ARGV[2]  failures allowed per account within the lockout window
-- ARGV[3]  failures allowed per client within the lockout window
-- ARGV[4]  lockout window in milliseconds (a counter expires this long after its first failure)
--
-- Returns {locked, retry_after_ms}: locked is 1 once a counter has reached its limit, and
-- retry_after_ms is how long until the longer of the two locks ends (0 when not locked).

local mode = ARGV[1]
local limits = { tonumber(ARGV[2]), tonumber(ARGV[3]) }
local window = tonumber(ARGV[4])

if mode == "fail" then
  for i = 1, 2 do
    local n = redis.call("INCR", KEYS[i])
    if n == 1 or redis.call("PTTL", KEYS[i]) < 0 then
      redis.call("PEXPIRE", KEYS[i], window)
    end
  end
end

local locked, retry = 0, 0
for i = 1, 2 do
  local n = tonumber(redis.call("GET", KEYS[i]) or "0")
  if n >= limits[i] then
    locked = 1
    local ttl = redis.call("PTTL", KEYS[i])
    if ttl > retry then retry = ttl end
  end
end
return { locked, retry }
