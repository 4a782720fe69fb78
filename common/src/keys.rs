//! The Redis key schema: every key either program reads or writes is built here and nowhere else.
//!
//! Every key a single Lua script touches must hash to one Redis Cluster slot, so per-user state is
//! tagged with the user's shard, `{s:<n>}` with n = user id mod [`SHARDS`]: one user's limits,
//! counters and rate-limit state, and the usage stream of that shard, all live in one slot.

use uuid::Uuid;

/// Number of shards users are spread over; each has one usage stream.
pub const SHARDS: u16 = 1024;

/// Fields of a user's hash (`Keys::user`).
pub mod user_field {
    /// `active` or `disabled`.
    pub const STATUS: &str = "status";
    /// `user` or `admin`.
    pub const ROLE: &str = "role";
    /// Access tokens issued before this (seconds since the epoch) are refused; 0 for none.
    pub const TOKENS_VALID_AFTER: &str = "tva";
    /// The current plan's id (forwarded to the app as `X-Plan`).
    pub const PLAN: &str = "plan";

    /// The field holding one quota's effective limit and window: `"<limit>|<window>"`.
    pub fn quota(app: &str, quota_type: &str) -> String {
        format!("q:{app}:{quota_type}")
    }

    /// The value of a quota field.
    pub fn quota_value(limit: i64, window: crate::window::Window) -> String {
        format!("{limit}|{}", window.as_str())
    }
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

    /// A user's counter for one quota type: `u` (used) and `w` (window start, ms).
    pub fn counter(&self, user: Uuid, app: &str, quota_type: &str) -> String {
        format!(
            "{}:{{s:{}}}:c:{user}:{app}:{quota_type}",
            self.prefix,
            shard(user)
        )
    }

    /// A user's GCRA state for one rate limit of one app.
    pub fn rate(&self, user: Uuid, app: &str, rule: &str) -> String {
        format!(
            "{}:{{s:{}}}:r:{user}:{app}:{rule}",
            self.prefix,
            shard(user)
        )
    }

    /// The usage stream of a shard; the control plane drains all [`SHARDS`] of them.
    pub fn usage_stream(&self, shard: u16) -> String {
        format!("{}:{{s:{shard}}}:usage", self.prefix)
    }

    /// Marks one request as settled (refunded or committed), so settling twice is harmless.
    pub fn settled(&self, user: Uuid, request: &str) -> String {
        format!("{}:{{s:{}}}:settled:{request}", self.prefix, shard(user))
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
    /// A user's status, role or limits changed.
    User(Uuid),
}

impl CacheEvent {
    pub fn encode(&self) -> String {
        match self {
            CacheEvent::ApiKey(hex) => format!("k {hex}"),
            CacheEvent::User(id) => format!("u {id}"),
        }
    }

    pub fn parse(message: &str) -> Option<CacheEvent> {
        let (kind, value) = message.split_once(' ')?;
        match kind {
            "k" if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(CacheEvent::ApiKey(value.to_owned()))
            }
            "u" => value.parse().ok().map(CacheEvent::User),
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
            keys.counter(user, "idoctor", "storage_bytes"),
            keys.rate(user, "idoctor", "per-second"),
            keys.usage_stream(shard(user)),
            keys.settled(user, "req-1"),
        ] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
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
        for event in [CacheEvent::User(id), CacheEvent::ApiKey("a".repeat(64))] {
            assert_eq!(CacheEvent::parse(&event.encode()), Some(event));
        }
        assert_eq!(CacheEvent::parse("k short"), None);
        assert_eq!(CacheEvent::parse("x y"), None);
        assert_eq!(CacheEvent::parse("u not-a-uuid"), None);
    }
}
