-- Accounts are compared by a normalised key, not by lower(email): NFKC with Unicode case
-- folding, so that the composed and decomposed forms of an address, and full-width letters, are
-- one account. The control plane computes the key (domain::accounts::email_key) and writes it
-- with every new user; the trigger fills it for rows written by hand in SQL.
ALTER TABLE users ADD COLUMN email_key text;

-- Existing rows: the closest SQL gets (lower() folds only what the database's locale knows).
UPDATE users SET email_key = lower(normalize(email, NFKC));

-- Two existing accounts that are now the same address: the older keeps the key; the newer one
-- gets a key no login produces (it can no longer log in by email; find them with
-- `SELECT id, email FROM users WHERE email_key LIKE '%#duplicate-of-%'`).
UPDATE users u
   SET email_key = u.email_key || '#duplicate-of-' || o.id
  FROM users o
 WHERE o.email_key = u.email_key
   AND (o.created_at, o.id) < (u.created_at, u.id)
   AND NOT EXISTS (SELECT 1 FROM users p
                    WHERE p.email_key = u.email_key AND (p.created_at, p.id) < (o.created_at, o.id));

ALTER TABLE users ALTER COLUMN email_key SET NOT NULL;
CREATE UNIQUE INDEX users_email_key_key ON users (email_key);

CREATE FUNCTION users_fill_email_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.email_key IS NULL THEN
        NEW.email_key := lower(normalize(NEW.email, NFKC));
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER users_fill_email_key BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION users_fill_email_key();
