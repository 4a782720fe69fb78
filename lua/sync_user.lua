-- sync_user.lua — write what sidecars need of one user, from the control plane, atomically.
--
-- Sets the user's status, role, token cut-off, plan and every quota's effective limit, removes
-- the limit fields of quotas the user no longer has, and writes a counter only where the user's
-- hash has none: a counter the sidecars are incrementing is never overwritten, and a counter
-- Redis lost is rebuilt from the ledger's figure (the caller reads it from PostgreSQL first; no
-- sidecar can start the counter from zero meanwhile, because without the hash every decision is
-- "missing"). Counter and GCRA fields are kept otherwise.
--
-- KEYS[1]  the user's hash (common/src/keys.rs)
-- ARGV[1] status  ARGV[2] role  ARGV[3] tokens valid after  ARGV[4] plan
-- ARGV[5] n, then n pairs: limit field, limit value
-- ARGV[6 + 2n] m, then m pairs: counter field, counter value, written only if the field is absent
--
-- Returns the number of counters it wrote.

local n = tonumber(ARGV[5])
local keep = {}
local set = { "status", ARGV[1], "role", ARGV[2], "tva", ARGV[3], "plan", ARGV[4] }
for i = 1, n do
  local a = 5 + (i - 1) * 2
  keep[ARGV[a + 1]] = true
  set[#set + 1] = ARGV[a + 1]
  set[#set + 1] = ARGV[a + 2]
end
for _, field in ipairs(redis.call("HKEYS", KEYS[1])) do
  if string.sub(field, 1, 2) == "q:" and not keep[field] then
    redis.call("HDEL", KEYS[1], field)
  end
end
redis.call("HSET", KEYS[1], unpack(set))
local m = tonumber(ARGV[6 + 2 * n])
local written = 0
for i = 1, m do
  local a = 6 + 2 * n + (i - 1) * 2
  written = written + redis.call("HSETNX", KEYS[1], ARGV[a + 1], ARGV[a + 2])
end
return written
