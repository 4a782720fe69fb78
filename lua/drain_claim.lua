-- drain_claim.lua — stage one shard's closed usage buckets for the ledger.
--
-- For each minute: a live bucket is renamed to its staging key and stamped with this pass's id
-- and time, unless a staged one is already there; a staged bucket is returned if this pass staged
-- it, or if it has waited longer than ARGV[3] (the pass that staged it died, or is stuck), but
-- not while another pass is still working on it — so replicas share the work instead of reading
-- the same buckets. Renaming means that a late write (a refund of a call decided in that minute)
-- starts a new bucket instead of changing what is being recorded. A staged bucket never changes;
-- drain_done.lua deletes it once the ledger has committed it, and the ledger records each stamp
-- once, so a staged bucket read twice is counted once.
--
-- KEYS    pairs, one per minute: the live bucket, its staging key (common/src/keys.rs)
-- ARGV[1] this pass's stamp   ARGV[2] now (ms)   ARGV[3] how long a staged bucket is left to
--         the pass that staged it (ms)
--
-- Returns, per staged bucket: {pair index (1-based), stamp, {field, value, field, value, ...}}.

local now, patience = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS / 2 do
  local live, staged = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call("EXISTS", staged) == 0 then
    if redis.call("EXISTS", live) == 1 then
      redis.call("RENAME", live, staged)
      redis.call("HSET", staged, "_id", ARGV[1], "_at", ARGV[2])
    end
  end
  local head = redis.call("HMGET", staged, "_id", "_at")
  if head[1] and (head[1] == ARGV[1] or now - tonumber(head[2] or "0") >= patience) then
    out[#out + 1] = { i, head[1], redis.call("HGETALL", staged) }
  end
end
return out
