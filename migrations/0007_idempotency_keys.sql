-- One mechanism for `Idempotency-Key` on every write that honours it (orders, admin grants,
-- resets, plan changes). A key belongs to the user who sent it; the first request that commits
-- stores its answer, and for 24 hours a retry with the same key and the same request gets that
-- answer back without the work being done again; the same key with another request is refused.
--
-- A request inserts its row first, in the transaction that does its work, and fills in the answer
-- before committing: a concurrent retry's insert waits on the unique key until that commit (then
-- replays the answer) or that rollback (then does the work itself). A committed row therefore
-- always has its answer.
CREATE TABLE idempotency_keys (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- The route the key was first used on, such as "POST /v1/admin/users/<id>/grants".
    request         text NOT NULL CHECK (length(request) BETWEEN 1 AND 600),
    -- SHA-256 of the request body as canonical JSON (keys sorted, no spaces). NULL only for keys
    -- carried over from orders below, whose bodies were never recorded: any body matches them.
    body_hash       bytea CHECK (body_hash IS NULL OR length(body_hash) = 32),
    response_status smallint CHECK (response_status BETWEEN 100 AND 599),
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
-- Pruning by age.
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

-- Orders kept their key on the order row until now. Keys of the last 24 hours move here with the
-- order as it was answered when created, so that a retry in flight across the upgrade still gets
-- its order back. `orders.idempotency_key` is no longer written; a later migration drops it.
INSERT INTO idempotency_keys (user_id, key, request, body_hash, response_status, response_body, created_at)
SELECT o.user_id, o.idempotency_key, 'POST /v1/orders', NULL, 201,
       convert_to((jsonb_strip_nulls(jsonb_build_object(
           'id', o.id,
           'status', 'pending',
           'plan_id', o.plan_id,
           'channel', o.channel,
           'amount', jsonb_build_object('amount', o.amount, 'currency', o.currency),
           'created_at', to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'expires_at', to_char(o.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'pay_url', o.pay_url,
           'code_url', o.code_url,
           'qr_svg_url', CASE WHEN o.code_url IS NOT NULL THEN '/v1/orders/' || o.id || '/qr.svg' END
       )) || jsonb_build_object('paid_at', NULL))::text, 'UTF8'),
       o.created_at
FROM orders o
WHERE o.idempotency_key IS NOT NULL AND o.created_at > now() - interval '24 hours';
