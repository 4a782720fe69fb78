-- decide.lua — admit or refuse one request, all-or-nothing, in one round trip.
--
-- Checks the user's status and token cut-off, every rate limit and every quota the route costs;
-- only if all pass does it take the costs, advance the rate limits and append one usage event per
-- quota to the shard's stream. All keys share the user's shard tag {s:<n>} (common/src/keys.rs).
--
-- KEYS[1]                 the user's hash: status, tva, plan, q:<app>:<type> = "<limit>|<window>"
-- KEYS[2]                 the shard's usage stream
-- KEYS[3 .. 2+nq]         one counter hash per quota: u = used, w = window start (ms)
-- KEYS[3+nq .. 2+nq+nr]   one GCRA state key per rate limit (theoretical arrival time, ms,
--                         kept to the microsecond so rates above 1,000/s stay exact)
-- KEYS[3+nq+nr]           the request's settle marker, "d|<taken>|<window start>|<entry id>|…"
--                         per quota, written when costs are taken, so that settle.lua gives back
--                         exactly what this call took (a client that timed out waiting for this
--                         answer can settle blindly)
--
-- ARGV[1]   now (ms since the epoch)
-- ARGV[2]   the access token's iat (s), or 0 for API keys
-- ARGV[3]   user id         ARGV[4] app         ARGV[5] method      ARGV[6] path
-- ARGV[7]   nq (quotas)     ARGV[8] nr (rate limits)
-- ARGV[9..14]   window starts (ms) for minute, hour, day, month, year, lifetime
-- ARGV[15..20]  window ends (ms) for the same; 0 for lifetime
-- then nq groups of 4: quota type, cost, event id, mode ("fixed", or "reserve" = take all that
--                      remains, at least 1, and append no event: settle.lua commits the real amount)
-- then nr groups of 4: rate-limit name, rate, period (ms), burst
--
-- Returns one of
--   {"missing"}                                   the user's hash does not exist
--   {"disabled"}                                  the user is disabled
--   {"revoked"}                                   the token was issued before the cut-off
--   {"rate_limited", name, retry_after_ms}
--   {"quota_exceeded", type, limit, used, resets_at_ms}
--   {"ok", plan, then per quota: limit, remaining, resets_at_ms, taken, window_start, entry_id,
--          then per rate limit: remaining, reset_ms}

local now = tonumber(ARGV[1])
local iat = tonumber(ARGV[2])
local user, app, method, path = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local nq, nr = tonumber(ARGV[7]), tonumber(ARGV[8])
local index = { minute = 0, hour = 1, day = 2, month = 3, year = 4, lifetime = 5 }
local RETAIN_MS = 7 * 24 * 3600 * 1000 -- counters outlive their window by a week
local function int(x) return string.format("%d", x) end

if redis.call("EXISTS", KEYS[1]) == 0 then return { "missing" } end
local head = redis.call("HMGET", KEYS[1], "status", "tva", "plan")
if head[1] ~= "active" then return { "disabled" } end
if iat > 0 and tonumber(head[2] or "0") >= iat then return { "revoked" } end

-- Rate limits (GCRA): check all first.
local rates = {}
for i = 1, nr do
  local a = 20 + nq * 4 + (i - 1) * 4
  local name, rate, period, burst = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local key = KEYS[2 + nq + i]
  local interval = period / rate
  local tat = tonumber(redis.call("GET", key) or "0")
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allowed_at = new_tat - burst * interval
  if allowed_at > now then
    return { "rate_limited", name, int(math.ceil(allowed_at - now)) }
  end
  rates[i] = { key = key, new_tat = new_tat, interval = interval, burst = burst }
end

-- Quotas: check all first.
local quotas = {}
for i = 1, nq do
  local a = 20 + (i - 1) * 4
  local qtype, cost, event, mode = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
  local def = redis.call("HGET", KEYS[1], "q:" .. app .. ":" .. qtype)
  local limit, window = 0, "lifetime"
  if def then
    local sep = string.find(def, "|", 1, true)
    limit = tonumber(string.sub(def, 1, sep - 1))
    window = string.sub(def, sep + 1)
  end
  local w = index[window] or 5
  local start, finish = tonumber(ARGV[9 + w]), tonumber(ARGV[15 + w])
  local counter = redis.call("HMGET", KEYS[2 + i], "u", "w")
  local used = 0
  if counter[2] and tonumber(counter[2]) == start then used = tonumber(counter[1] or "0") end
  local remaining = limit - used
  if remaining < 0 then remaining = 0 end
  local take = cost
  if mode == "reserve" then take = remaining end
  if remaining < cost or (mode == "reserve" and remaining < 1) then
    return { "quota_exceeded", qtype, int(limit), int(used), int(finish) }
  end
  quotas[i] = { key = KEYS[2 + i], qtype = qtype, take = take, used = used, limit = limit,
                start = start, finish = finish, event = event, mode = mode }
end

-- Every check passed: apply.
local out = { "ok", head[3] or "" }
local marker = { "d" }
for i = 1, nq do
  local q = quotas[i]
  redis.call("HSET", q.key, "u", int(q.used + q.take), "w", int(q.start))
  if q.finish > 0 then
    redis.call("PEXPIREAT", q.key, q.finish + RETAIN_MS)
  else
    redis.call("PERSIST", q.key)
  end
  local entry = ""
  if q.mode ~= "reserve" then
    entry = redis.call("XADD", KEYS[2], "*", "k", "use", "e", q.event, "u", user, "a", app,
      "t", q.qtype, "n", int(q.take), "m", method, "p", path, "ts", now)
  end
  table.insert(marker, int(q.take))
  table.insert(marker, int(q.start))
  table.insert(marker, entry)
  local left = q.limit - q.used - q.take
  table.insert(out, int(q.limit))
  table.insert(out, int(left))
  table.insert(out, int(q.finish))
  table.insert(out, int(q.take))
  table.insert(out, int(q.start))
  table.insert(out, entry)
end
if nq > 0 then
  -- What was taken, where, and which events were appended: settle.lua gives back exactly this.
  redis.call("SET", KEYS[3 + nq + nr], table.concat(marker, "|"), "PX", 86400000)
end
for i = 1, nr do
  local r = rates[i]
  redis.call("SET", r.key, string.format("%.3f", r.new_tat), "PX", int(math.ceil(r.new_tat - now) + 1000))
  local remaining = math.floor((r.burst * r.interval - (r.new_tat - now)) / r.interval)
  table.insert(out, int(remaining))
  table.insert(out, int(math.ceil(r.new_tat - now)))
end
return out
