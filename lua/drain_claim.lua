-- drain_claim.lua — stage one shard's closed usage buckets for the ledger.
--
-- For each minute, a bucket already staged (by a drain pass that crashed, or by another replica's
-- pass under way) is returned as it is; otherwise the live bucket is renamed to its staging key
-- and stamped with this pass's id. Renaming means that a late write (a refund of a call decided
-- in that minute) starts a new bucket instead of changing what is being recorded. A staged bucket
-- never changes; it is deleted by drain_done.lua once the ledger has committed it, and the ledger
-- records each stamp once, so a staged bucket read twice is counted once.
--
-- KEYS    pairs, one per minute: the live bucket, its staging key (common/src/keys.rs)
-- ARGV[1] this pass's id
--
-- Returns, per staged bucket: {pair index (1-based), stamp, {field, value, field, value, ...}}.

local out = {}
for i = 1, #KEYS / 2 do
  local live, staged = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call("EXISTS", staged) == 0 and redis.call("EXISTS", live) == 1 then
    redis.call("RENAME", live, staged)
    redis.call("HSET", staged, "_id", ARGV[1])
  end
  local fields = redis.call("HGETALL", staged)
  if #fields > 0 then
    out[#out + 1] = { i, redis.call("HGET", staged, "_id") or "", fields }
  end
end
return out
