-- Tollgate's relational schema: identity, the app and plan registry, subscriptions, payments and
-- the usage ledger. Later migrations add columns; they should not need to reshape these tables.
--
-- Conventions: ids are UUIDs except where a human-chosen key is the identity (apps, plans,
-- orders, whose id is the out_trade_no sent to the gateway); times are timestamptz; money is
-- bigint minor units; every enum is a text column with a CHECK so that a bad value is refused by
-- the database, not only by the code.

-- Users. Email is unique case-insensitively: "A@x.com" and "a@x.com" are one account.
CREATE TABLE users (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email              text NOT NULL CHECK (length(email) BETWEEN 3 AND 254 AND email LIKE '_%@_%'),
    password_hash      text NOT NULL,
    role               text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status             text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    -- Access tokens issued before this instant are refused (set when a user is disabled or
    -- signs out everywhere); NULL means none are.
    tokens_valid_after timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
CREATE INDEX users_created_at_idx ON users (created_at, id);

-- Refresh tokens are single use and rotate; all tokens descended from one login form a family,
-- which is revoked whole when a spent token is presented again.
CREATE TABLE refresh_token_families (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_reason text CHECK (revoked_reason IN ('logout', 'reuse', 'user_disabled', 'admin'))
);
CREATE INDEX refresh_token_families_user_idx ON refresh_token_families (user_id) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    family_id   uuid NOT NULL REFERENCES refresh_token_families (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    parent_id   uuid REFERENCES refresh_tokens (id) ON DELETE SET NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    spent_at    timestamptz,
    CHECK (expires_at > issued_at)
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);

-- API keys are stored only as a hash; `prefix` is the non-secret start shown in listings.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at);

-- Apps and their quota types are data, so a new app needs no code change.
CREATE TABLE apps (
    id         text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quota_types (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id     text NOT NULL REFERENCES apps (id) ON DELETE RESTRICT,
    key        text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_]{0,62}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    unit       text NOT NULL CHECK (unit IN ('calls', 'bytes', 'items', 'tokens')),
    "window"   text NOT NULL CHECK ("window" IN ('minute', 'hour', 'day', 'month', 'year', 'lifetime')),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (app_id, key)
);

CREATE TABLE plans (
    id           text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_amount bigint NOT NULL CHECK (price_amount >= 0),
    currency     text NOT NULL DEFAULT 'CNY' CHECK (currency ~ '^[A-Z]{3}$'),
    period       text NOT NULL CHECK (period IN ('month', 'year')),
    public       boolean NOT NULL DEFAULT true,
    -- Order on the plans page.
    sort_order   integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plan_quotas (
    plan_id       text NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    quota_type_id bigint NOT NULL REFERENCES quota_types (id) ON DELETE RESTRICT,
    "limit"       bigint NOT NULL CHECK ("limit" >= 0),
    PRIMARY KEY (plan_id, quota_type_id)
);

-- Every user has exactly one current (active) subscription: `free` from registration, a paid
-- plan while its period runs. period_end NULL means open-ended (the free plan).
CREATE TABLE subscriptions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    plan_id         text NOT NULL REFERENCES plans (id) ON DELETE RESTRICT,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'expired', 'replaced', 'refunded')),
    period_start    timestamptz NOT NULL DEFAULT now(),
    period_end      timestamptz,
    source_order_id text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (period_end IS NULL OR period_end > period_start)
);
CREATE UNIQUE INDEX subscriptions_one_active_per_user ON subscriptions (user_id) WHERE status = 'active';
CREATE INDEX subscriptions_lapsing_idx ON subscriptions (period_end) WHERE status = 'active' AND period_end IS NOT NULL;

-- Admin top-ups: `amount` is added to the limit for the window that starts at window_start.
CREATE TABLE quota_grants (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    quota_type_id bigint NOT NULL REFERENCES quota_types (id) ON DELETE RESTRICT,
    amount        bigint NOT NULL CHECK (amount > 0),
    window_start  timestamptz NOT NULL,
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    actor_id      uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quota_grants_user_window_idx ON quota_grants (user_id, quota_type_id, window_start);

-- Admin resets of a window's usage. Rebuilding `used` from the ledger counts only what came
-- after the latest reset in the window, so a reset survives the loss of Redis.
CREATE TABLE quota_resets (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    quota_type_id bigint NOT NULL REFERENCES quota_types (id) ON DELETE RESTRICT,
    window_start  timestamptz NOT NULL,
    reset_at      timestamptz NOT NULL DEFAULT now(),
    actor_id      uuid REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX quota_resets_user_window_idx ON quota_resets (user_id, quota_type_id, window_start, reset_at);

-- Orders: the id is the out_trade_no sent to the gateway.
CREATE TABLE orders (
    id               text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_]{1,64}$'),
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    plan_id          text NOT NULL REFERENCES plans (id) ON DELETE RESTRICT,
    channel          text NOT NULL CHECK (channel IN ('alipay_page', 'alipay_wap', 'wechat_native')),
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'closed', 'refunded')),
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    gateway_trade_no text,
    pay_url          text,
    code_url         text,
    refunded_amount  bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0 AND refunded_amount <= amount),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    paid_at          timestamptz,
    closed_at        timestamptz,
    refunded_at      timestamptz,
    CHECK (status <> 'paid' OR paid_at IS NOT NULL),
    UNIQUE (user_id, idempotency_key),
    UNIQUE (channel, gateway_trade_no)
);
CREATE INDEX orders_user_idx ON orders (user_id, created_at DESC);
CREATE INDEX orders_pending_idx ON orders (created_at) WHERE status = 'pending';

ALTER TABLE subscriptions
    ADD CONSTRAINT subscriptions_source_order_fkey FOREIGN KEY (source_order_id) REFERENCES orders (id) ON DELETE RESTRICT;
-- An order activates or extends a subscription at most once.
CREATE UNIQUE INDEX subscriptions_source_order_key ON subscriptions (source_order_id) WHERE source_order_id IS NOT NULL;

-- Every gateway notification is stored raw before it is acted on, verified or not. Exactly one
-- delivery per (channel, out_trade_no, event) is ever `processed`; the rest are `duplicate`.
CREATE TABLE payment_notifications (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel      text NOT NULL CHECK (channel IN ('alipay', 'wechat')),
    out_trade_no text,
    event        text,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    raw_body     bytea NOT NULL,
    verified     boolean NOT NULL,
    result       text NOT NULL CHECK (result IN ('received', 'processed', 'duplicate', 'rejected', 'ignored')),
    error        text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (result NOT IN ('processed', 'duplicate') OR verified)
);
CREATE UNIQUE INDEX payment_notifications_once ON payment_notifications (channel, out_trade_no, event) WHERE result = 'processed';
CREATE INDEX payment_notifications_order_idx ON payment_notifications (out_trade_no, received_at);

-- The usage ledger: one row per admitted, successful metered request, keyed by the event id the
-- sidecar generated, so a redelivered event is ignored.
CREATE TABLE usage_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    app_id     text NOT NULL,
    quota_key  text NOT NULL,
    amount     bigint NOT NULL CHECK (amount >= 0),
    method     text NOT NULL CHECK (length(method) BETWEEN 1 AND 16),
    path       text NOT NULL,
    status     smallint CHECK (status BETWEEN 100 AND 599),
    created_at timestamptz NOT NULL,
    FOREIGN KEY (app_id, quota_key) REFERENCES quota_types (app_id, key) ON DELETE RESTRICT
);
-- GET /v1/usage: a user's events newest first, optionally by app/type and time range.
CREATE INDEX usage_events_user_time_idx ON usage_events (user_id, created_at DESC, id DESC);
-- Rebuilding a window's `used` after Redis is lost.
CREATE INDEX usage_events_user_type_time_idx ON usage_events (user_id, app_id, quota_key, created_at);

-- Changes that must reach Redis. Written in the same transaction as the change; a worker applies
-- and deletes them, so a crash between PostgreSQL and Redis heals itself.
CREATE TABLE sync_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic      text NOT NULL CHECK (topic IN ('user', 'api_key', 'plan')),
    subject    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every administrative change, with the acting admin.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_id    uuid REFERENCES users (id) ON DELETE SET NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_target_idx ON audit_log (target_type, target_id, created_at);
CREATE INDEX audit_log_created_idx ON audit_log (created_at);
