-- login_throttle.lua — failed-login counters with growing waits, for one account from one client
-- and for one client (any account). Nothing is counted per account alone: failures from other
-- clients never make an account's owner wait.
--
-- KEYS[1]  hash: failures of this account from this client   ({login}-tagged, common/src/keys.rs)
-- KEYS[2]  hash: failures of this client, any account
--          fields: n (failures in the window), until (ms since the epoch before which to wait)
-- ARGV[1]  "check" (must the caller wait?), "fail" (count one failure, then check) or
--          "succeed" (forget this account's failures from this client, then check)
-- ARGV[2]  failures per account and client at which waits begin
-- ARGV[3]  failures per client at which waits begin
-- ARGV[4]  the wait after that failure, ms; every further failure doubles it
-- ARGV[5]  longest wait, ms
-- ARGV[6]  window, ms: a counter is forgotten this long after its last failure (or its wait)
-- ARGV[7]  now, ms since the epoch
--
-- Returns {waiting, retry_after_ms}: waiting is 1 while either counter's wait lasts, and
-- retry_after_ms is how long the longer of the two still lasts (0 when not waiting).

local mode = ARGV[1]
local free = { tonumber(ARGV[2]), tonumber(ARGV[3]) }
local base = tonumber(ARGV[4])
local longest = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local now = tonumber(ARGV[7])

-- Counters of an older release were plain strings: start those afresh.
for i = 1, 2 do
  local kind = redis.call("TYPE", KEYS[i])["ok"]
  if kind ~= "hash" and kind ~= "none" then redis.call("DEL", KEYS[i]) end
end

if mode == "fail" then
  for i = 1, 2 do
    local n = redis.call("HINCRBY", KEYS[i], "n", 1)
    local wait = 0
    if n >= free[i] then
      wait = math.min(base * 2 ^ (n - free[i]), longest)
      redis.call("HSET", KEYS[i], "until", math.floor(now + wait))
    end
    redis.call("PEXPIRE", KEYS[i], math.floor(window + wait))
  end
elseif mode == "succeed" then
  redis.call("DEL", KEYS[1])
end

local retry = 0
for i = 1, 2 do
  local untl = tonumber(redis.call("HGET", KEYS[i], "until") or "0")
  if untl - now > retry then retry = untl - now end
end
if retry > 0 then
  return { 1, math.floor(retry) }
end
return { 0, 0 }
