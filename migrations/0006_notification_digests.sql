-- Payment notifications are verified before they are stored. A verified one is kept whole; one
-- that does not verify is kept only as a bounded record: its size, its SHA-256, the reason and
-- its first bytes (raw_body then holds at most 256 bytes and body_truncated says whether there
-- was more), so that nobody can fill the database through the notification endpoints.
ALTER TABLE payment_notifications
    ADD COLUMN body_bytes bigint CHECK (body_bytes >= 0),
    ADD COLUMN body_sha256 text CHECK (body_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN body_truncated boolean NOT NULL DEFAULT false;
