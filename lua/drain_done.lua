-- drain_done.lua — delete staged usage buckets once the ledger has committed them.
--
-- Deletes a staging key only if it still carries the stamp that was recorded, so that a pass
-- finishing late never deletes a bucket staged after it read.
--
-- KEYS     staging keys of one shard (common/src/keys.rs)
-- ARGV[i]  the stamp recorded for KEYS[i]
--
-- Returns how many it deleted.

local n = 0
for i = 1, #KEYS do
  if redis.call("HGET", KEYS[i], "_id") == ARGV[i] then
    redis.call("DEL", KEYS[i])
    n = n + 1
  end
end
return n
