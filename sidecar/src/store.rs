//! Everything the sidecar asks Redis, through the scripts in `lua/` (called by SHA) and the key
//! schema of `tollgate_common::keys`. One admitted request is one `decide` call.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use tollgate_common::keys::{self, Keys, api_key_field};
use tollgate_common::protocol::{self, charge_mode, decide_reply, settle_mode};
use tollgate_common::window::{BoundsCache, Window};
use uuid::Uuid;

use crate::routes::{Quota, RateLimit};

static DECIDE: &str = include_str!("../../lua/decide.lua");
static SETTLE: &str = include_str!("../../lua/settle.lua");
static RESERVE: &str = include_str!("../../lua/reserve.lua");

/// A Redis failure, and whether it is transient — the bit the fail-open / fail-closed policy
/// needs (a timeout or a lost connection is; a script error is not).
#[derive(Debug, thiserror::Error)]
#[error("redis {op}: {source}")]
pub struct StoreError {
    pub op: &'static str,
    #[source]
    pub source: Error,
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self.source.kind(),
            ErrorKind::IO
                | ErrorKind::Timeout
                | ErrorKind::Canceled
                | ErrorKind::Cluster
                | ErrorKind::Backpressure
                | ErrorKind::NotFound
        ) || self.source.details().starts_with("LOADING")
            || self.source.details().starts_with("TRYAGAIN")
            || self.source.details().starts_with("CLUSTERDOWN")
    }
}

fn op(op: &'static str) -> impl FnOnce(Error) -> StoreError {
    move |source| StoreError { op, source }
}

#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub keys: Keys,
    decide: Script,
    settle: Script,
    reserve: Script,
    /// Script calls in flight at once: more wait here, before their timeout starts.
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

/// What one request asks `decide.lua` for.
#[derive(Clone, Copy)]
pub struct DecideInput<'a> {
    pub user: Uuid,
    /// The sidecar's own id of this request, naming its settle marker (never a client's id).
    pub settle_id: &'a str,
    /// The access token's issued-at (s), or 0 for API keys.
    pub iat: i64,
    /// The route's quota and this request's cost, for metered routes.
    pub charge: Option<Charge<'a>>,
    pub rates: &'a [RateLimit],
    pub now_ms: i64,
    /// How long the settle marker lives (the sidecar renews it while the app is answering).
    pub marker_ttl_ms: u64,
    pub windows: &'a BoundsCache,
}

/// The quota one request is charged.
#[derive(Clone, Copy)]
pub struct Charge<'a> {
    pub quota: &'a Quota,
    /// The cost; for a reservation, the most to take.
    pub cost: u64,
    /// Take up to `cost` of what remains (an upload of unknown length); settle commits the
    /// real size.
    pub reserve: bool,
}

/// What an admitted request was charged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charged {
    pub limit: i64,
    pub remaining: i64,
    /// ms since the epoch; 0 for lifetime quotas.
    pub resets_at_ms: i64,
    pub taken: i64,
    pub window_start_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The user's hash is not in Redis yet.
    Missing,
    Disabled,
    /// The access token was issued before the user's cut-off.
    Revoked,
    RateLimited {
        /// Index into the route's rate limits.
        rule: usize,
        retry_after_ms: i64,
    },
    QuotaExceeded {
        limit: i64,
        used: i64,
        resets_at_ms: i64,
    },
    /// A refund for this request got there first (its answer had been given up on).
    Cancelled,
    Admitted {
        plan: String,
        /// `None` for a route without a quota.
        charged: Option<Charged>,
        /// Per rate limit: remaining requests and ms until fully reset.
        rates: Vec<(i64, i64)>,
    },
}

/// A live API key as the control plane wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub user: Uuid,
    pub key_id: Uuid,
    /// Seconds since the epoch; 0 for never.
    pub expires_at: i64,
}

/// How a request is settled.
pub struct SettleInput<'a> {
    pub refund: bool,
    pub user: Uuid,
    pub settle_id: &'a str,
    pub quota: &'a Quota,
    /// The `now_ms` its decision was made with: which minute's bucket it added to.
    pub decided_ms: i64,
    /// The real amount, for a commit.
    pub actual: u64,
    /// How long a refund's tombstone lives when it finds no marker.
    pub marker_ttl_ms: u64,
}

impl Store {
    pub fn new(client: Client, keys: Keys) -> Store {
        Store {
            client,
            keys,
            decide: Script::from_lua(DECIDE),
            settle: Script::from_lua(SETTLE),
            reserve: Script::from_lua(RESERVE),
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(128)),
        }
    }

    /// The same store over another connection (another worker's), sharing the in-flight limit.
    pub fn with_client(&self, client: Client) -> Store {
        Store {
            client,
            ..self.clone()
        }
    }

    /// At most `n` script calls in flight at once (`redis_max_in_flight`).
    pub fn with_max_in_flight(mut self, n: usize) -> Store {
        self.permits = std::sync::Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore is never closed; without a permit the call just goes ahead.
        self.permits.acquire().await.ok()
    }

    /// Loads both scripts (on every node of a cluster) so the hot path only ever sends EVALSHA.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        self.decide
            .load(&self.client)
            .await
            .map_err(op("load decide.lua"))?;
        self.settle
            .load(&self.client)
            .await
            .map_err(op("load settle.lua"))?;
        self.reserve
            .load(&self.client)
            .await
            .map_err(op("load reserve.lua"))
    }

    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        let options = Options {
            timeout: Some(timeout),
            fail_fast: true,
            max_attempts: Some(1),
            ..Options::default()
        };
        self.client
            .with_options(&options)
            .ping::<()>(None)
            .await
            .map_err(op("ping"))
    }

    /// Admits or refuses one request (`lua/decide.lua`): one EVALSHA, or two the first time a
    /// route meets a quota whose window it has not learned yet.
    pub async fn decide(&self, input: &DecideInput<'_>) -> Result<Decision, StoreError> {
        let first = self.decide_once(input).await?;
        let Reply::Window(window) = first else {
            return first.into_decision();
        };
        // Learn the window and ask again with its bounds; a second mismatch is a fault.
        if let Some(charge) = input.charge {
            charge.quota.learn_window(window);
        }
        match self.decide_once(input).await? {
            Reply::Window(w) => Err(unexpected(
                "decide",
                format!("the quota's window changed twice ({w:?})"),
            )),
            reply => reply.into_decision(),
        }
    }

    async fn decide_once(&self, input: &DecideInput<'_>) -> Result<Reply, StoreError> {
        let user = input.user;
        let user_id = user.to_string();
        let shard = keys::shard(user);
        let mut keys = Vec::with_capacity(3);
        keys.push(self.keys.user(user));
        let nq = usize::from(input.charge.is_some());
        let mut args: Vec<Value> = Vec::with_capacity(5 + 9 * nq + 4 * input.rates.len());
        args.push(input.now_ms.into());
        args.push(input.iat.into());
        args.push(user_id.into());
        args.push((input.rates.len() as i64).into());
        args.push((nq as i64).into());
        if let Some(charge) = input.charge {
            let quota = charge.quota;
            let window = quota.window();
            let (start, end) = input.windows.get(window, input.now_ms);
            keys.push(self.keys.bucket(shard, keys::bucket_start(input.now_ms)));
            keys.push(self.keys.marker(user, input.settle_id));
            args.push(quota.limit_field.as_str().into());
            args.push(quota.counter_field.as_str().into());
            args.push(quota.bucket_suffix.as_str().into());
            args.push(clamp(charge.cost).into());
            let mode = if charge.reserve {
                charge_mode::RESERVE
            } else {
                charge_mode::FIXED
            };
            args.push(mode.into());
            args.push(window.as_str().into());
            args.push(start.into());
            args.push(end.into());
            args.push(clamp(input.marker_ttl_ms).into());
        }
        for rate in input.rates {
            args.push(rate.field.as_str().into());
            args.push(clamp(rate.rate).into());
            args.push(clamp(rate.period_ms).into());
            args.push(clamp(rate.burst).into());
        }
        let _permit = self.permit().await;
        let out: Vec<String> = boxed(self.decide.evalsha_with_reload(&self.client, keys, args))
            .await
            .map_err(op("decide"))?;
        parse_decision(&out, nq == 1, input.rates.len())
    }

    /// Gives back what `decide` took (`refund`), or commits a reserved upload's actual size
    /// (`lua/settle.lua`). `Ok(false)`: there was nothing to settle (never decided, or settled).
    pub async fn settle(&self, input: &SettleInput<'_>) -> Result<bool, StoreError> {
        let user = input.user;
        let keys = vec![
            self.keys.user(user),
            self.keys.marker(user, input.settle_id),
            self.keys
                .bucket(keys::shard(user), keys::bucket_start(input.decided_ms)),
        ];
        let args: Vec<Value> = vec![
            if input.refund {
                settle_mode::REFUND
            } else {
                settle_mode::COMMIT
            }
            .into(),
            input.quota.counter_field.as_str().into(),
            user.to_string().into(),
            input.quota.bucket_suffix.as_str().into(),
            clamp(input.actual).into(),
            clamp(input.marker_ttl_ms).into(),
        ];
        let _permit = self.permit().await;
        let settled: i64 = boxed(self.settle.evalsha_with_reload(&self.client, keys, args))
            .await
            .map_err(op("settle"))?;
        Ok(settled == 1)
    }

    /// Tells every sidecar that a user's usage changed (a refund left quota where one of them
    /// may have cached a refusal).
    pub async fn announce_user(&self, user: Uuid) -> Result<(), StoreError> {
        boxed(self.client.publish::<(), _, _>(
            self.keys.events_channel(),
            keys::CacheEvent::User(user).encode(),
        ))
        .await
        .map_err(op("announce"))
    }

    /// Takes up to `step` more of an upload's quota (`lua/reserve.lua`); returns what it took,
    /// 0 when nothing remains.
    pub async fn reserve_more(
        &self,
        user: Uuid,
        settle_id: &str,
        quota: &Quota,
        step: u64,
        marker_ttl_ms: u64,
    ) -> Result<u64, StoreError> {
        let keys = vec![self.keys.user(user), self.keys.marker(user, settle_id)];
        let args: Vec<Value> = vec![
            quota.limit_field.as_str().into(),
            quota.counter_field.as_str().into(),
            clamp(step).into(),
            clamp(marker_ttl_ms).into(),
        ];
        let _permit = self.permit().await;
        let took: i64 = boxed(self.reserve.evalsha_with_reload(&self.client, keys, args))
            .await
            .map_err(op("reserve"))?;
        Ok(took.max(0) as u64)
    }

    /// Keeps a request's settle marker alive while the app is still answering.
    pub async fn renew_marker(
        &self,
        user: Uuid,
        settle_id: &str,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        boxed(self.client.pexpire::<(), _>(
            self.keys.marker(user, settle_id),
            clamp(ttl_ms),
            Some(fred::types::ExpireOptions::XX),
        ))
        .await
        .map_err(op("renew marker"))
    }

    /// The owner of an API key, by the hex of its hash; `None` if Redis has no live key so.
    pub async fn api_key(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError> {
        let fields: HashMap<String, String> =
            boxed(self.client.hgetall(self.keys.api_key(hash_hex)))
                .await
                .map_err(op("api key lookup"))?;
        let record = (|| {
            Some(KeyRecord {
                user: fields.get(api_key_field::USER_ID)?.parse().ok()?,
                key_id: fields.get(api_key_field::KEY_ID)?.parse().ok()?,
                expires_at: fields.get(api_key_field::EXPIRES_AT)?.parse().ok()?,
            })
        })();
        Ok(record)
    }

    /// Notes an API key's use for the control plane to record (batched there).
    pub async fn note_key_use(&self, key_id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        boxed(self.client.zadd::<(), _, _>(
            self.keys.api_key_last_used(),
            None,
            Some(fred::types::sorted_sets::Ordering::GreaterThan),
            false,
            false,
            protocol::key_use(key_id, now.timestamp()),
        ))
        .await
        .map_err(op("note key use"))
    }
}

/// A script's answer, before it is a [`Decision`].
enum Reply {
    Decided(Decision),
    /// The quota's window is not the one bounds were sent for.
    Window(Window),
}

impl Reply {
    fn into_decision(self) -> Result<Decision, StoreError> {
        match self {
            Reply::Decided(d) => Ok(d),
            Reply::Window(w) => Err(unexpected("decide", format!("window {w:?}"))),
        }
    }
}

/// A Redis call's future on the heap. fred's command futures take several KB each, and the
/// request's future, which holds every future it awaits, is moved into a task of its own per
/// request (proxy.rs): boxed, the request path copies a few hundred bytes instead of ~46 KB.
fn boxed<'a, T>(
    call: impl Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(call)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A reply the scripts never give: not transient, so the request is refused (fail-closed) or
/// forwarded uncounted (fail-open) like any other fault, never admitted with made-up figures.
fn unexpected(op: &'static str, what: String) -> StoreError {
    StoreError {
        op,
        source: Error::new(ErrorKind::Parse, format!("unexpected reply: {what}")),
    }
}

fn parse_decision(out: &[String], metered: bool, rates: usize) -> Result<Reply, StoreError> {
    let bad = || unexpected("decide", format!("{out:?}"));
    let num = |i: usize| -> Result<i64, StoreError> {
        out.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad)
    };
    let decision = match out.first().map(String::as_str) {
        Some(decide_reply::MISSING) => Decision::Missing,
        Some(decide_reply::DISABLED) => Decision::Disabled,
        Some(decide_reply::REVOKED) => Decision::Revoked,
        Some(decide_reply::CANCELLED) => Decision::Cancelled,
        Some(decide_reply::RATE_LIMITED) => Decision::RateLimited {
            rule: usize::try_from(num(1)?)
                .map_err(|_| bad())?
                .saturating_sub(1),
            retry_after_ms: num(2)?,
        },
        Some(decide_reply::QUOTA_EXCEEDED) => Decision::QuotaExceeded {
            limit: num(1)?,
            used: num(2)?,
            resets_at_ms: num(3)?,
        },
        Some(decide_reply::WINDOW) => {
            let window = out.get(1).and_then(|w| Window::parse(w)).ok_or_else(bad)?;
            return Ok(Reply::Window(window));
        }
        Some(decide_reply::OK) if out.len() == decide_reply::OK_HEAD + 2 * rates => {
            Decision::Admitted {
                plan: out.get(1).cloned().unwrap_or_default(),
                charged: if metered {
                    Some(Charged {
                        limit: num(2)?,
                        remaining: num(3)?,
                        resets_at_ms: num(4)?,
                        taken: num(5)?,
                        window_start_ms: num(6)?,
                    })
                } else {
                    None
                },
                rates: (0..rates)
                    .map(|i| {
                        let at = decide_reply::OK_HEAD + i * 2;
                        Ok((num(at)?, num(at + 1)?))
                    })
                    .collect::<Result<_, StoreError>>()?,
            }
        }
        // Anything else, an `ok` of the wrong length included, is a fault: never an admission.
        _ => return Err(bad()),
    };
    Ok(Reply::Decided(decision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn replies_decode_or_fail() {
        let ok = parse_decision(
            &reply(&["ok", "pro", "10", "7", "99", "1", "5", "3", "400"]),
            true,
            1,
        );
        let Ok(Reply::Decided(Decision::Admitted {
            plan,
            charged,
            rates,
        })) = ok
        else {
            panic!("admitted");
        };
        assert_eq!(plan, "pro");
        assert_eq!(
            charged.map(|c| (c.limit, c.remaining, c.taken)),
            Some((10, 7, 1))
        );
        assert_eq!(rates, vec![(3, 400)]);
        assert!(matches!(
            parse_decision(&reply(&["window", "day"]), true, 0),
            Ok(Reply::Window(Window::Day))
        ));
        assert!(matches!(
            parse_decision(&reply(&["rate_limited", "2", "1500"]), false, 2),
            Ok(Reply::Decided(Decision::RateLimited {
                rule: 1,
                retry_after_ms: 1500
            }))
        ));
        // Anything else is an error, never an admission with zeros.
        for bad in [
            reply(&[]),
            reply(&["ok"]),
            reply(&["ok", "pro", "10", "7", "99", "1", "5"]),
            reply(&["ok", "pro", "x", "7", "99", "1", "5", "3", "400"]),
            reply(&["window", "fortnight"]),
            reply(&["what"]),
        ] {
            let err = parse_decision(&bad, true, 1).err().expect("an error");
            assert!(!err.is_transient(), "{bad:?}");
        }
    }
}
