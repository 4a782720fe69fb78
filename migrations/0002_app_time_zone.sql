-- Quota windows (calendar day, month, year) follow each app's business time zone, an IANA name.
-- The app's sidecars must be configured with the same zone (`time_zone` in the routes file).
ALTER TABLE apps ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC' CHECK (length(time_zone) BETWEEN 1 AND 64);
UPDATE apps SET time_zone = 'Asia/Shanghai' WHERE id = 'idoctor';
