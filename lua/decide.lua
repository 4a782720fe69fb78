-- decide.lua — admit or refuse one request, all-or-nothing, in one round trip.
--
-- Checks the user's status and token cut-off, every rate limit and the route's quota; only if all
-- pass does it take the cost, advance the rate limits and add the cost to this minute's usage
-- bucket of the user's shard. Everything it reads about the user is one hash (one HMGET) and
-- everything it writes there is one HSET; a metered request adds a settle marker (one SET) and
-- two HINCRBYs: at most 5 commands. All keys share the user's shard tag {s:<n>}
-- (common/src/keys.rs, which also builds every field name passed in).
--
-- KEYS[1]   the user's hash: status, tva, plan, q:<app>:<type> = "<limit>|<window>",
--           c:<app>:<type> = "<used>|<window start ms>", r:<app>:<rule> = GCRA theoretical arrival
--           time (ms, kept to the microsecond so rates above 1,000/s stay exact)
-- KEYS[2]   metered routes only: the shard's usage bucket of the minute of ARGV[1]; fields
--           "a:<user>|<app>|<type>|<route>" (amount) and "n:…" (calls)
-- KEYS[3]   metered routes only: the request's settle marker, "<taken>|<window start>|<mode>",
--           written with SET NX: a marker already there is settle.lua's tombstone for a request
--           whose answer was given up on, and the decision is then cancelled
--
-- ARGV[1]   now (ms since the epoch)
-- ARGV[2]   the access token's iat (s), or 0 for API keys
-- ARGV[3]   user id
-- ARGV[4]   nr, the number of rate limits
-- ARGV[5]   nq, 1 for a metered route, else 0
-- if nq == 1:
--   ARGV[6]  the quota's limit field, ARGV[7] its counter field
--   ARGV[8]  the bucket field suffix "<app>|<type>|<route>"
--   ARGV[9]  cost   ARGV[10] mode: "fixed", or "reserve" (an upload of unknown length: take up to
--            ARGV[9] of what remains, at least 1, and add nothing to the bucket; settle.lua
--            commits the real amount)
--   ARGV[11] the window the caller computed bounds for, ARGV[12] its start (ms),
--            ARGV[13] its end (ms; 0 for lifetime)
--   ARGV[14] the marker's time to live (ms)
-- then nr groups of 4, from ARGV[6 + 9 * nq]: GCRA field, rate, period (ms), burst
--
-- Returns one of (numbers as integer replies)
--   {"missing"}                                   the user's hash does not exist
--   {"disabled"}                                  the user is disabled
--   {"revoked"}                                   the token was issued before the cut-off
--   {"rate_limited", i, retry_after_ms}           the i-th rate limit (1-based) refused
--   {"window", window}                            the quota's window is not ARGV[11]: call again
--                                                 with this window's bounds
--   {"quota_exceeded", limit, used, resets_at_ms}
--   {"cancelled"}                                 settle.lua already gave this request up
--   {"ok", plan, limit, remaining, resets_at_ms, taken, window_start, then per rate limit:
--          remaining, reset_ms}                   (the five quota values are 0 when nq == 0)

local now = tonumber(ARGV[1])
local iat = tonumber(ARGV[2])
local user = ARGV[3]
local nr, nq = tonumber(ARGV[4]), tonumber(ARGV[5])
local rbase = 5 + 9 * nq
-- Integers are returned as Lua numbers (Redis answers them as integers, nothing to format); only
-- what is stored is formatted, with %d, never in exponent notation.
local function int(x) return string.format("%d", x) end

local fields = { "status", "tva", "plan" }
if nq == 1 then
  fields[4] = ARGV[6]
  fields[5] = ARGV[7]
end
for i = 1, nr do fields[#fields + 1] = ARGV[rbase + (i - 1) * 4 + 1] end
local got = redis.call("HMGET", KEYS[1], unpack(fields))

if not got[1] then return { "missing" } end
if got[1] ~= "active" then return { "disabled" } end
if iat > 0 and tonumber(got[2] or "0") >= iat then return { "revoked" } end

-- Rate limits (GCRA): check all first.
local writes = {}
local rates = {}
local rfirst = 4 + 2 * nq
for i = 1, nr do
  local a = rbase + (i - 1) * 4
  local rate, period, burst = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local interval = period / rate
  local tat = tonumber(got[rfirst + i - 1] or "0")
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allowed_at = new_tat - burst * interval
  if allowed_at > now then
    return { "rate_limited", i, math.ceil(allowed_at - now) }
  end
  rates[i] = { new_tat = new_tat, interval = interval, burst = burst }
  writes[#writes + 1] = ARGV[a + 1]
  writes[#writes + 1] = string.format("%.3f", new_tat)
end

local out = { "ok", got[3] or "" }
if nq == 1 then
  local cost, mode = tonumber(ARGV[9]), ARGV[10]
  local limit, window = 0, ARGV[11]
  if got[4] then
    local sep = string.find(got[4], "|", 1, true)
    limit = tonumber(string.sub(got[4], 1, sep - 1))
    window = string.sub(got[4], sep + 1)
  end
  if window ~= ARGV[11] then return { "window", window } end
  local start, finish = tonumber(ARGV[12]), tonumber(ARGV[13])
  local used = 0
  if got[5] then
    local sep = string.find(got[5], "|", 1, true)
    if tonumber(string.sub(got[5], sep + 1)) == start then
      used = tonumber(string.sub(got[5], 1, sep - 1))
    end
  end
  local remaining = limit - used
  if remaining < 0 then remaining = 0 end
  local take = cost
  if mode == "reserve" and remaining < take then take = remaining end
  if remaining < take or take < 1 and mode == "reserve" then
    return { "quota_exceeded", limit, used, finish }
  end
  -- Every check passed. The marker first: if settle.lua has given this request up, stop here.
  local marked = redis.call("SET", KEYS[3], int(take) .. "|" .. int(start) .. "|" .. mode,
    "NX", "PX", ARGV[14])
  if not marked then return { "cancelled" } end
  writes[#writes + 1] = ARGV[7]
  writes[#writes + 1] = int(used + take) .. "|" .. int(start)
  if mode ~= "reserve" then
    local suffix = user .. "|" .. ARGV[8]
    if take > 0 then redis.call("HINCRBY", KEYS[2], "a:" .. suffix, take) end
    redis.call("HINCRBY", KEYS[2], "n:" .. suffix, 1)
  end
  out[3] = limit
  out[4] = limit - used - take
  out[5] = finish
  out[6] = take
  out[7] = start
else
  out[3], out[4], out[5], out[6], out[7] = 0, 0, 0, 0, 0
end
if #writes > 0 then redis.call("HSET", KEYS[1], unpack(writes)) end
for i = 1, nr do
  local r = rates[i]
  out[#out + 1] = math.floor((r.burst * r.interval - (r.new_tat - now)) / r.interval)
  out[#out + 1] = math.ceil(r.new_tat - now)
end
return out
