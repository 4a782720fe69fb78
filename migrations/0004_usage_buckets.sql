-- Usage as aggregates instead of one row per call. Sidecars add each call's cost to a per-minute
-- bucket in Redis; the control plane drains closed buckets into `usage_minutes` and, in the same
-- transaction, into `usage_months` (months in the app's time zone). Minute rows are pruned after
-- a configurable retention; month rows are kept. Per-call detail lives in the sidecars' access
-- log, not here.

-- One row per (user, app, quota type, route, minute): what the user's admitted, successful calls
-- took, and how many calls that was. Refunded calls count nowhere.
CREATE TABLE usage_minutes (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    minute    timestamptz NOT NULL CHECK (date_trunc('minute', minute) = minute),
    app_id    text NOT NULL,
    quota_key text NOT NULL,
    route     text NOT NULL CHECK (length(route) BETWEEN 1 AND 600),
    amount    bigint NOT NULL,
    calls     bigint NOT NULL,
    PRIMARY KEY (user_id, minute, app_id, quota_key, route),
    FOREIGN KEY (app_id, quota_key) REFERENCES quota_types (app_id, key) ON DELETE RESTRICT
);
-- Pruning by age.
CREATE INDEX usage_minutes_minute_idx ON usage_minutes (minute);

-- The same, per calendar month of the app's time zone; `month` is the month's first instant.
CREATE TABLE usage_months (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    month     timestamptz NOT NULL,
    app_id    text NOT NULL,
    quota_key text NOT NULL,
    route     text NOT NULL CHECK (length(route) BETWEEN 1 AND 600),
    amount    bigint NOT NULL,
    calls     bigint NOT NULL,
    PRIMARY KEY (user_id, month, app_id, quota_key, route),
    FOREIGN KEY (app_id, quota_key) REFERENCES quota_types (app_id, key) ON DELETE RESTRICT
);

-- Each drain pass stamps the buckets it stages in Redis with its id; the ledger applies a staged
-- bucket — (stamp, shard, minute) — once, so a pass that crashed after its commit and is read
-- again, or two replicas reading one bucket, add nothing. Pruned after a day (a staged bucket is
-- taken over within a minute or two while any control plane runs).
CREATE TABLE usage_drains (
    stamp      uuid NOT NULL,
    shard      smallint NOT NULL,
    minute     timestamptz NOT NULL,
    drained_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stamp, shard, minute)
);
CREATE INDEX usage_drains_drained_at_idx ON usage_drains (drained_at);

-- Up to where every shard's buckets have been drained for good (the drain's catch-up point after
-- an outage). One row.
CREATE TABLE usage_drain_cursor (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    drained timestamptz NOT NULL
);

-- A reset records what it cleared, so that rebuilding a lost counter is exact: the window's sum
-- less what its resets cleared.
ALTER TABLE quota_resets ADD COLUMN cleared bigint NOT NULL DEFAULT 0 CHECK (cleared >= 0);
UPDATE quota_resets r SET cleared = (
    SELECT COALESCE(sum(e.amount), 0)
    FROM usage_events e JOIN quota_types qt ON qt.app_id = e.app_id AND qt.key = e.quota_key
    WHERE e.user_id = r.user_id AND qt.id = r.quota_type_id
      AND e.created_at >= GREATEST(r.window_start, COALESCE(
          (SELECT max(p.reset_at) FROM quota_resets p
           WHERE p.user_id = r.user_id AND p.quota_type_id = r.quota_type_id
             AND p.window_start = r.window_start AND p.reset_at < r.reset_at), r.window_start))
      AND e.created_at < r.reset_at);

-- Existing per-call rows become buckets; their route is what they recorded, "<METHOD> <path>".
INSERT INTO usage_minutes (user_id, minute, app_id, quota_key, route, amount, calls)
SELECT user_id, date_trunc('minute', created_at), app_id, quota_key,
       left(method || ' ' || path, 600), sum(amount), count(*)
FROM usage_events
GROUP BY 1, 2, 3, 4, 5;
INSERT INTO usage_months (user_id, month, app_id, quota_key, route, amount, calls)
SELECT e.user_id, date_trunc('month', e.created_at, a.time_zone), e.app_id, e.quota_key,
       left(e.method || ' ' || e.path, 600), sum(e.amount), count(*)
FROM usage_events e JOIN apps a ON a.id = e.app_id
GROUP BY 1, 2, 3, 4, 5;

DROP TABLE usage_refunds;
DROP TABLE usage_events;
