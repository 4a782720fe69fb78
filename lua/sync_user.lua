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
-- ARGV[1]  the prefix of limit fields (user_field::QUOTA_PREFIX): a field with this prefix that is
--          not among the n below is the limit of a quota the user no longer has, and is removed
-- ARGV[2]  n, then n pairs: field, value — the status, role, token cut-off, plan and every limit
--          (field names are built in common/src/keys.rs, never here)
-- ARGV[3 + 2n] m, then m pairs: counter field, counter value, written only if the field is absent
--
-- Returns the number of counters it wrote.

local prefix = ARGV[1]
local n = tonumber(ARGV[2])
local keep = {}
local set = {}
for i = 1, n do
  local a = 2 + (i - 1) * 2
  keep[ARGV[a + 1]] = true
  set[#set + 1] = ARGV[a + 1]
  set[#set + 1] = ARGV[a + 2]
end
for _, field in ipairs(redis.call("HKEYS", KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix and not keep[field] then
    redis.call("HDEL", KEYS[1], field)
  end
end
if n > 0 then redis.call("HSET", KEYS[1], unpack(set)) end
local m = tonumber(ARGV[3 + 2 * n])
local written = 0
for i = 1, m do
  local a = 3 + 2 * n + (i - 1) * 2
  written = written + redis.call("HSETNX", KEYS[1], ARGV[a + 1], ARGV[a + 2])
end
return written
