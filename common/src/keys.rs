//! The Redis key schema: every key either program reads or writes is built here and nowhere else.
//!
//! Every key a single Lua script touches must hash to one Redis Cluster slot, so per-user state is
//! tagged with the user's shard, `{s:<n>}` with n = user id mod [`SHARDS`]: one user's hash
//! (limits, counters, rate-limit state), its requests' settle markers and the shard's usage
//! buckets all live in one slot.

use uuid::Uuid;

/// Number of shards users are spread over; each has one usage bucket a minute.
pub const SHARDS: u16 = 1024;

/// Fields of a user's hash (`Keys::user`). Everything one decision reads about a user is in this
/// one hash, so `lua/decide.lua` reads it with a single HMGET and writes it with a single HSET.
/// No script builds one of these fields: both programs pass whole field names, made here, except
/// the status, token cut-off and plan that `decide.lua` reads by name (`protocol`'s tests check
/// the scripts' spelling).
pub mod user_field {
    use crate::window::Window;

    /// `active` or `disabled`.
    pub const STATUS: &str = "status";
    /// `user` or `admin`.
    pub const ROLE: &str = "role";
    /// Access tokens issued before this (seconds since the epoch) are refused; 0 for none.
    pub const TOKENS_VALID_AFTER: &str = "tva";
    /// The current plan's id (forwarded to the app as `X-Plan`).
    pub const PLAN: &str = "plan";
    /// Prefix of a quota's effective limit field, written by the control plane.
    pub const QUOTA_PREFIX: &str = "q:";
    /// Prefix of a quota's counter field, written by the scripts.
    pub const COUNTER_PREFIX: &str = "c:";
    /// Prefix of a rate limit's GCRA state field, written by `decide.lua`.
    pub const RATE_PREFIX: &str = "r:";

    /// The field holding one quota's effective limit and window: `"<limit>|<window>"`.
    pub fn quota(app: &str, quota_type: &str) -> String {
        format!("{QUOTA_PREFIX}{app}:{quota_type}")
    }

    /// The value of a quota field.
    pub fn quota_value(limit: i64, window: Window) -> String {
        format!("{limit}|{}", window.as_str())
    }

    /// The field counting one quota's use: `"<used>|<window start, ms>"`. A counter of an
    /// earlier window means nothing is used in the current one yet.
    pub fn counter(app: &str, quota_type: &str) -> String {
        format!("{COUNTER_PREFIX}{app}:{quota_type}")
    }

    /// The value of a counter field.
    pub fn counter_value(used: i64, window_start_ms: i64) -> String {
        format!("{used}|{window_start_ms}")
    }

    /// `(used, window start ms)` of a counter field's value.
    pub fn parse_counter(value: &str) -> Option<(i64, i64)> {
        let (used, start) = value.split_once('|')?;
        Some((used.parse().ok()?, start.parse().ok()?))
    }

    /// The field holding one rate limit's GCRA state (theoretical arrival time, ms, kept to the
    /// microsecond) for one app.
    pub fn rate(app: &str, rule: &str) -> String {
        format!("{RATE_PREFIX}{app}:{rule}")
    }
}

/// Fields of a shard's usage bucket (`Keys::bucket`): per user, app, quota type and route, the
/// amount taken (`a:`) and the calls that took it (`n:`) in one minute.
pub mod bucket_field {
    use uuid::Uuid;

    pub const AMOUNT_PREFIX: &str = "a:";
    pub const CALLS_PREFIX: &str = "n:";
    /// Set by `lua/drain_claim.lua` on a bucket being drained: the id of the drain pass that
    /// staged it, and when (ms). Every field starting with `_` is bookkeeping, not usage.
    pub const STAGED_BY: &str = "_id";
    pub const STAGED_AT: &str = "_at";

    /// What follows the user in a bucket field: `<app>|<quota type>|<route>`. A sidecar builds
    /// it once per route; the scripts prepend the prefix and the user (so that a request sends
    /// no field built for it alone), spelling the prefixes as here (`protocol`'s tests).
    pub fn suffix(app: &str, quota_type: &str, route: &str) -> String {
        format!("{app}|{quota_type}|{route}")
    }

    /// One parsed bucket field.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Field<'a> {
        /// `true` for the amount, `false` for the calls.
        pub amount: bool,
        pub user: Uuid,
        pub app: &'a str,
        pub quota_type: &'a str,
        pub route: &'a str,
    }

    /// Parses `a:<user>|<app>|<type>|<route>` or `n:…`; `None` for anything else (the staging
    /// id included).
    pub fn parse(field: &str) -> Option<Field<'_>> {
        let (amount, rest) = if let Some(rest) = field.strip_prefix(AMOUNT_PREFIX) {
            (true, rest)
        } else {
            (false, field.strip_prefix(CALLS_PREFIX)?)
        };
        let mut parts = rest.splitn(4, '|');
        let user = parts.next()?.parse().ok()?;
        let app = parts.next()?;
        let quota_type = parts.next()?;
        let route = parts.next()?;
        Some(Field {
            amount,
            user,
            app,
            quota_type,
            route,
        })
    }
}

/// Length of a usage bucket, ms.
pub const BUCKET_MS: i64 = 60_000;

/// The start (ms) of the usage bucket holding an instant (ms).
pub fn bucket_start(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// Fields of an API key's hash (`Keys::api_key`).
pub mod api_key_field {
    pub const USER_ID: &str = "uid";
    pub const KEY_ID: &str = "kid";
    /// Expiry in seconds since the epoch; 0 for none.
    pub const EXPIRES_AT: &str = "exp";
}

/// The shard of a user.
pub fn shard(user: Uuid) -> u16 {
    (user.as_u128() % u128::from(SHARDS)) as u16
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` separates deployments (and tests) sharing one Redis.
    pub fn new(prefix: impl Into<String>) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A user's hash: status, role, token cut-off, and (with plans) limits.
    pub fn user(&self, user: Uuid) -> String {
        format!("{}:{{s:{}}}:u:{user}", self.prefix, shard(user))
    }

    /// A shard's usage bucket for the minute starting at `minute_ms` (see [`bucket_field`]).
    /// Sidecars add to it; the control plane drains it once the minute has closed.
    pub fn bucket(&self, shard: u16, minute_ms: i64) -> String {
        format!("{}:{{s:{shard}}}:b:{minute_ms}", self.prefix)
    }

    /// The bucket being drained: `lua/drain_claim.lua` renames a closed bucket to this, so that
    /// late writes start a new bucket instead of changing what is being recorded.
    pub fn bucket_staging(&self, shard: u16, minute_ms: i64) -> String {
        format!("{}:{{s:{shard}}}:b:{minute_ms}:d", self.prefix)
    }

    /// One admitted request's settle marker, named by the request's settle id (the sidecar's
    /// own, never the client's request id): what `decide.lua` took, so that `settle.lua` gives
    /// back exactly that, once. It lives for the sidecar's settle window only.
    pub fn marker(&self, user: Uuid, settle_id: &str) -> String {
        format!("{}:{{s:{}}}:m:{settle_id}", self.prefix, shard(user))
    }

    /// An API key's hash, by the hex of the key's SHA-256.
    pub fn api_key(&self, hash_hex: &str) -> String {
        format!("{}:k:{hash_hex}", self.prefix)
    }

    /// Pattern matching every API key hash, for reconciliation.
    pub fn api_key_pattern(&self) -> String {
        format!("{}:k:*", self.prefix)
    }

    /// Sorted set of API key ids by last use (seconds), drained into PostgreSQL in batches.
    pub fn api_key_last_used(&self) -> String {
        format!("{}:keys:last_used", self.prefix)
    }

    /// Pub/sub channel on which cache invalidations are published (see [`CacheEvent`]).
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Failed-login counter of one account (by a hash of the lowercased email). Shares the
    /// `{login}` tag with the per-client counter so one script can check both.
    pub fn login_failures_account(&self, email_hash_hex: &str) -> String {
        format!("{}:{{login}}:a:{email_hash_hex}", self.prefix)
    }

    /// Failed logins of one account (by a hash of its normalised email) from one client: what
    /// login throttling counts, so that an attack from elsewhere never locks the owner out.
    pub fn login_failures_pair(&self, email_hash_hex: &str, client: &str) -> String {
        format!("{}:{{login}}:ac:{email_hash_hex}:{client}", self.prefix)
    }

    /// Failed-login counter of one client address.
    pub fn login_failures_client(&self, client: &str) -> String {
        format!("{}:{{login}}:c:{client}", self.prefix)
    }
}

/// A message on [`Keys::events_channel`]: drop this from your caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// An API key was revoked or changed; payload is the hex of its hash.
    ApiKey(String),
    /// A user's status, role, limits or usage changed.
    User(Uuid),
    /// Everything may have changed (Redis was rebuilt by a reconcile): drop every cached key
    /// and refusal.
    All,
}

impl CacheEvent {
    pub fn encode(&self) -> String {
        match self {
            CacheEvent::ApiKey(hex) => format!("k {hex}"),
            CacheEvent::User(id) => format!("u {id}"),
            CacheEvent::All => "a *".to_owned(),
        }
    }

    pub fn parse(message: &str) -> Option<CacheEvent> {
        let (kind, value) = message.split_once(' ')?;
        match kind {
            "k" if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(CacheEvent::ApiKey(value.to_owned()))
            }
            "u" => value.parse().ok().map(CacheEvent::User),
            "a" if value == "*" => Some(CacheEvent::All),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster uses to place a key: the text inside the first `{...}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("tagged");
        let close = key[open..].find('}').expect("closed") + open;
        &key[open + 1..close]
    }

    #[test]
    fn user_keys_carry_the_shard_tag() {
        let keys = Keys::new("tg");
        let user: Uuid = "6f1c2d9e-8a4b-4c3d-9e2f-0123456789ab"
            .parse()
            .expect("uuid");
        let key = keys.user(user);
        assert_eq!(hash_tag(&key), format!("s:{}", shard(user)));
        assert!(key.starts_with("tg:{s:"));
    }

    #[test]
    fn everything_one_decision_touches_shares_the_users_slot() {
        let keys = Keys::new("tg");
        let user = Uuid::new_v4();
        let tag = hash_tag(&keys.user(user)).to_owned();
        for key in [
            keys.bucket(shard(user), 1_700_000_040_000),
            keys.bucket_staging(shard(user), 1_700_000_040_000),
            keys.marker(user, "req-1"),
        ] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
    }

    #[test]
    fn counter_values_round_trip() {
        assert_eq!(
            user_field::parse_counter(&user_field::counter_value(42, 1_700_000_000_000)),
            Some((42, 1_700_000_000_000))
        );
        assert_eq!(user_field::parse_counter("x|1"), None);
        assert_eq!(user_field::parse_counter("7"), None);
    }

    #[test]
    fn bucket_fields_parse() {
        let user = Uuid::new_v4();
        let suffix = bucket_field::suffix("idoctor", "storage_bytes", "POST /a|b/{x}");
        let field = format!("{}{user}|{suffix}", bucket_field::AMOUNT_PREFIX);
        assert_eq!(
            bucket_field::parse(&field),
            Some(bucket_field::Field {
                amount: true,
                user,
                app: "idoctor",
                quota_type: "storage_bytes",
                route: "POST /a|b/{x}",
            })
        );
        let calls = format!("{}{user}|{suffix}", bucket_field::CALLS_PREFIX);
        assert!(!bucket_field::parse(&calls).expect("calls").amount);
        for bad in [
            bucket_field::STAGED_BY,
            "a:not-a-uuid|x|y|z",
            "a:x",
            "z:abc",
        ] {
            assert_eq!(bucket_field::parse(bad), None, "{bad}");
        }
        assert_eq!(bucket_start(1_700_000_059_999), 1_700_000_040_000);
        assert_eq!(bucket_start(-1), -60_000);
    }

    #[test]
    fn login_counters_share_one_slot() {
        let keys = Keys::new("tg");
        assert_eq!(
            hash_tag(&keys.login_failures_account("ab")),
            hash_tag(&keys.login_failures_client("127.0.0.1"))
        );
        assert_eq!(
            hash_tag(&keys.login_failures_pair("ab", "127.0.0.1")),
            hash_tag(&keys.login_failures_client("127.0.0.1"))
        );
    }

    #[test]
    fn shards_spread_and_stay_in_range() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            let s = shard(Uuid::new_v4());
            assert!(s < SHARDS);
            seen.insert(s);
        }
        assert!(seen.len() > 900, "only {} shards used", seen.len());
    }

    #[test]
    fn cache_events_round_trip() {
        let id = Uuid::new_v4();
        for event in [
            CacheEvent::User(id),
            CacheEvent::ApiKey("a".repeat(64)),
            CacheEvent::All,
        ] {
            assert_eq!(CacheEvent::parse(&event.encode()), Some(event));
        }
        assert_eq!(CacheEvent::parse("k short"), None);
        assert_eq!(CacheEvent::parse("x y"), None);
        assert_eq!(CacheEvent::parse("u not-a-uuid"), None);
    }
}
