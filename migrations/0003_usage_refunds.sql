-- Requests refunded by a sidecar (the app failed) after their usage event may already have been
-- drained. A refund deletes the ledger row and leaves this tombstone, so a usage event drained
-- after its refund (by another replica) is not inserted: a refunded request ends up nowhere.
CREATE TABLE usage_refunds (
    event_id    uuid PRIMARY KEY,
    refunded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_refunds_refunded_at_idx ON usage_refunds (refunded_at);
