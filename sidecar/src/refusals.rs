//! Refusals answered without Redis (envoy ratelimit's local cache of over-limit keys): a user the
//! sidecar has just seen refused — a quota exhausted until its window resets, a rate limit until
//! `Retry-After`, a disabled account, a user who does not exist — is refused from here until
//! then, so a client that keeps hammering costs Redis nothing. Admissions always go through
//! Redis, so exactness is untouched; what this can do wrong is refuse for a while a request that
//! Redis would now admit, which the entries' bounds keep short:
//!
//! - the control plane announces every change that can turn a refusal into an admission (grant,
//!   plan change, reset, enable, reconcile) on the events channel, and the subscriber drops the
//!   user's entries (`forget`), or all of them (`forget_all`) after a reconnect;
//! - a refund that leaves quota for others (another sidecar may hold a refusal) is announced by
//!   the refunding sidecar, and drops the user's entries here at once;
//! - no entry lives longer than `max_ttl`, whatever it says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use uuid::Uuid;

/// One cached quota refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRefusal {
    pub limit: i64,
    pub used: i64,
    /// ms since the epoch; 0 for lifetime quotas.
    pub resets_at_ms: i64,
}

/// What a cached refusal answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// The user does not exist (a valid token of a deleted user).
    Unknown,
    Disabled,
    RateLimited {
        retry_after: Duration,
    },
    QuotaExceeded(QuotaRefusal),
}

#[derive(Debug, Clone, Default)]
struct Entry {
    unknown_until: Option<Instant>,
    disabled_until: Option<Instant>,
    /// Per quota type: until, and the refusal (with what remained then).
    quotas: Vec<(Arc<str>, Instant, QuotaRefusal)>,
    /// Per rate-limit field: until.
    rates: Vec<(String, Instant)>,
}

impl Entry {
    fn live(mut self, now: Instant) -> Entry {
        self.unknown_until = self.unknown_until.filter(|t| *t > now);
        self.disabled_until = self.disabled_until.filter(|t| *t > now);
        self.quotas.retain(|(_, t, _)| *t > now);
        self.rates.retain(|(_, t)| *t > now);
        self
    }
}

pub struct Refusals {
    users: Cache<Uuid, Arc<Entry>>,
    max_ttl: Duration,
}

impl Refusals {
    pub fn new(capacity: usize, max_ttl: Duration) -> Refusals {
        Refusals {
            users: Cache::new(capacity.max(1)),
            max_ttl,
        }
    }

    /// A cached refusal of this request, if one holds now: `quota` is the route's quota type and
    /// this request's cost (`None` for a reservation of unknown size, refused only when nothing
    /// remains), `rates` the fields of the route's rate limits.
    pub fn check<'a>(
        &self,
        user: Uuid,
        quota: Option<(&str, Option<u64>)>,
        rates: impl Iterator<Item = &'a str>,
    ) -> Option<Cached> {
        let entry = self.users.get(&user)?;
        let now = Instant::now();
        if entry.unknown_until.is_some_and(|t| t > now) {
            return Some(Cached::Unknown);
        }
        if entry.disabled_until.is_some_and(|t| t > now) {
            return Some(Cached::Disabled);
        }
        for field in rates {
            if let Some((_, until)) = entry.rates.iter().find(|(f, t)| f == field && *t > now) {
                return Some(Cached::RateLimited {
                    retry_after: until.duration_since(now),
                });
            }
        }
        let (quota_type, cost) = quota?;
        let (_, _, refusal) = entry
            .quotas
            .iter()
            .find(|(q, t, _)| &**q == quota_type && *t > now)?;
        let remaining = (refusal.limit - refusal.used).max(0) as u64;
        match cost {
            Some(cost) if cost <= remaining => None,
            None if remaining > 0 => None,
            _ => Some(Cached::QuotaExceeded(refusal.clone())),
        }
    }

    fn update(&self, user: Uuid, change: impl FnOnce(&mut Entry)) {
        let now = Instant::now();
        let mut entry = self
            .users
            .get(&user)
            .map(|e| Entry::clone(&e).live(now))
            .unwrap_or_default();
        change(&mut entry);
        self.users.insert(user, Arc::new(entry));
    }

    fn until(&self, wait: Duration) -> Instant {
        Instant::now() + wait.min(self.max_ttl)
    }

    pub fn note_unknown(&self, user: Uuid) {
        let until = self.until(self.max_ttl);
        self.update(user, |e| e.unknown_until = Some(until));
    }

    pub fn note_disabled(&self, user: Uuid) {
        let until = self.until(self.max_ttl);
        self.update(user, |e| e.disabled_until = Some(until));
    }

    pub fn note_rate_limited(&self, user: Uuid, field: &str, retry_after: Duration) {
        let until = self.until(retry_after);
        self.update(user, |e| {
            e.rates.retain(|(f, _)| f != field);
            e.rates.push((field.to_owned(), until));
        });
    }

    /// A quota refusal holds until the window resets (`resets_at_ms`, 0 for never).
    pub fn note_quota(&self, user: Uuid, quota_type: &Arc<str>, refusal: QuotaRefusal) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let wait = if refusal.resets_at_ms > 0 {
            Duration::from_millis(refusal.resets_at_ms.saturating_sub(now_ms).max(0) as u64)
        } else {
            self.max_ttl
        };
        let until = self.until(wait);
        self.update(user, |e| {
            e.quotas.retain(|(q, _, _)| q != quota_type);
            e.quotas.push((quota_type.clone(), until, refusal));
        });
    }

    /// The user's limits, status or usage changed: nothing cached about them holds any more.
    pub fn forget(&self, user: Uuid) {
        self.users.remove(&user);
    }

    /// After missed announcements (a reconnect) or a rebuild of Redis.
    pub fn forget_all(&self) {
        self.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(limit: i64, used: i64) -> QuotaRefusal {
        QuotaRefusal {
            limit,
            used,
            resets_at_ms: chrono::Utc::now().timestamp_millis() + 60_000,
        }
    }

    #[test]
    fn refusals_hold_for_what_they_cover_and_no_longer() {
        let r = Refusals::new(100, Duration::from_secs(60));
        let user = Uuid::new_v4();
        let calls: Arc<str> = "calls".into();
        let none = std::iter::empty::<&str>;
        assert_eq!(r.check(user, Some(("calls", Some(1))), none()), None);

        // 2 remain: a call costing 3 is refused from here, one costing 2 goes to Redis.
        r.note_quota(user, &calls, quota(10, 8));
        assert!(matches!(
            r.check(user, Some(("calls", Some(3))), none()),
            Some(Cached::QuotaExceeded(q)) if q.used == 8
        ));
        assert_eq!(r.check(user, Some(("calls", Some(2))), none()), None);
        assert_eq!(r.check(user, Some(("calls", None)), none()), None);
        assert_eq!(r.check(user, Some(("other", Some(9))), none()), None);
        r.note_quota(user, &calls, quota(10, 10));
        assert!(r.check(user, Some(("calls", None)), none()).is_some());

        r.note_rate_limited(user, "r:app:per-second", Duration::from_millis(300));
        let rates = ["r:app:per-second"];
        match r.check(user, None, rates.iter().copied()) {
            Some(Cached::RateLimited { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(300))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.check(user, None, ["r:app:other"].into_iter()), None);

        r.forget(user);
        assert_eq!(r.check(user, Some(("calls", Some(3))), none()), None);

        r.note_disabled(user);
        assert_eq!(r.check(user, None, none()), Some(Cached::Disabled));
        r.forget_all();
        assert_eq!(r.check(user, None, none()), None);
    }

    #[test]
    fn nothing_outlives_the_cap_or_its_own_time() {
        let r = Refusals::new(100, Duration::from_millis(30));
        let user = Uuid::new_v4();
        r.note_unknown(user);
        r.note_rate_limited(user, "r:a:b", Duration::from_secs(3600));
        assert_eq!(
            r.check(user, None, std::iter::empty()),
            Some(Cached::Unknown)
        );
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.check(user, None, ["r:a:b"].into_iter()), None);
    }
}
