//! Everything the sidecar asks Redis, through the scripts in `lua/` (called by SHA) and the key
//! schema of `tollgate_common::keys`. One admitted request is one `decide` call.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use fred::prelude::*;
use fred::types::scripts::Script;
use tollgate_common::keys::{Keys, api_key_field};
use tollgate_common::window::{self, Window};
use uuid::Uuid;

use crate::routes::RateLimit;

static DECIDE: &str = include_str!("../../lua/decide.lua");
static SETTLE: &str = include_str!("../../lua/settle.lua");

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
}

/// One quota a request is charged.
#[derive(Clone, Copy)]
pub struct Charge<'a> {
    pub quota_type: &'a str,
    pub cost: u64,
    pub event_id: Uuid,
    /// Take everything that remains (an upload of unknown length); settle commits the real size.
    pub reserve: bool,
}

#[derive(Clone, Copy)]
pub struct DecideInput<'a> {
    pub user: Uuid,
    /// The sidecar's own id of this request (settle.lua's marker).
    pub request: &'a str,
    /// The access token's issued-at (s), or 0 for API keys.
    pub iat: i64,
    pub app: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub charges: &'a [Charge<'a>],
    pub rates: &'a [RateLimit],
    pub now: DateTime<Utc>,
    pub time_zone: Tz,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charged {
    pub limit: i64,
    pub remaining: i64,
    /// ms since the epoch; 0 for lifetime quotas.
    pub resets_at_ms: i64,
    pub taken: i64,
    pub window_start_ms: i64,
    /// The usage event's stream entry, if one was appended.
    pub entry_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The user's hash is not in Redis yet.
    Missing,
    Disabled,
    /// The access token was issued before the user's cut-off.
    Revoked,
    RateLimited {
        name: String,
        retry_after_ms: i64,
    },
    QuotaExceeded {
        quota_type: String,
        limit: i64,
        used: i64,
        resets_at_ms: i64,
    },
    Admitted {
        plan: String,
        charged: Vec<Charged>,
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

fn num(values: &[String], i: usize) -> i64 {
    values.get(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Store {
    pub fn new(client: Client, keys: Keys) -> Store {
        Store {
            client,
            keys,
            decide: Script::from_lua(DECIDE),
            settle: Script::from_lua(SETTLE),
        }
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
            .map_err(op("load settle.lua"))
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

    pub async fn decide(&self, input: &DecideInput<'_>) -> Result<Decision, StoreError> {
        let user = input.user;
        let mut keys = Vec::with_capacity(2 + input.charges.len() + input.rates.len());
        keys.push(self.keys.user(user));
        keys.push(self.keys.usage_stream(tollgate_common::keys::shard(user)));
        for charge in input.charges {
            keys.push(self.keys.counter(user, input.app, charge.quota_type));
        }
        for rate in input.rates {
            keys.push(self.keys.rate(user, input.app, &rate.name));
        }
        keys.push(self.keys.settled(user, input.request));
        let mut args: Vec<String> =
            Vec::with_capacity(20 + 4 * (input.charges.len() + input.rates.len()));
        args.push(input.now.timestamp_millis().to_string());
        args.push(input.iat.to_string());
        args.push(user.to_string());
        args.push(input.app.to_owned());
        args.push(input.method.to_owned());
        args.push(input.path.to_owned());
        args.push(input.charges.len().to_string());
        args.push(input.rates.len().to_string());
        let bounds: Vec<window::Bounds> = Window::ALL
            .iter()
            .map(|w| window::bounds(*w, input.now, input.time_zone))
            .collect();
        for b in &bounds {
            args.push(b.start.timestamp_millis().to_string());
        }
        for b in &bounds {
            args.push(b.end.map_or(0, |e| e.timestamp_millis()).to_string());
        }
        for charge in input.charges {
            args.push(charge.quota_type.to_owned());
            args.push(charge.cost.to_string());
            args.push(charge.event_id.to_string());
            args.push(if charge.reserve { "reserve" } else { "fixed" }.to_owned());
        }
        for rate in input.rates {
            args.push(rate.name.clone());
            args.push(rate.rate.to_string());
            args.push(rate.period_ms.to_string());
            args.push(rate.burst.to_string());
        }
        let out: Vec<String> = self
            .decide
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(op("decide"))?;
        Ok(parse_decision(&out, input.charges.len(), input.rates.len()))
    }

    /// Gives back what `decide` took (`refund`), or commits a reserved upload's actual size.
    pub async fn settle(&self, input: &SettleInput<'_>) -> Result<bool, StoreError> {
        let user = input.user;
        let mut keys = Vec::with_capacity(2 + input.items.len());
        keys.push(self.keys.usage_stream(tollgate_common::keys::shard(user)));
        keys.push(self.keys.settled(user, input.request_id));
        for item in input.items {
            keys.push(self.keys.counter(user, input.app, item.quota_type));
        }
        let mut args: Vec<String> = vec![
            if input.refund { "refund" } else { "commit" }.to_owned(),
            user.to_string(),
            input.app.to_owned(),
            input.method.to_owned(),
            input.path.to_owned(),
            input.now.timestamp_millis().to_string(),
            input.items.len().to_string(),
        ];
        for item in input.items {
            args.push(item.quota_type.to_owned());
            args.push(item.event_id.to_string());
            args.push(item.actual.to_string());
        }
        let settled: i64 = self
            .settle
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(op("settle"))?;
        Ok(settled == 1)
    }

    /// The owner of an API key, by the hex of its hash; `None` if Redis has no live key so.
    pub async fn api_key(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError> {
        let fields: HashMap<String, String> = self
            .client
            .hgetall(self.keys.api_key(hash_hex))
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
        self.client
            .zadd::<(), _, _>(
                self.keys.api_key_last_used(),
                None,
                Some(fred::types::sorted_sets::Ordering::GreaterThan),
                false,
                false,
                (now.timestamp() as f64, key_id.to_string()),
            )
            .await
            .map_err(op("note key use"))
    }
}

pub struct SettleItem<'a> {
    pub quota_type: &'a str,
    pub event_id: Uuid,
    /// The real amount, for `commit`.
    pub actual: u64,
}

pub struct SettleInput<'a> {
    pub refund: bool,
    pub user: Uuid,
    pub request_id: &'a str,
    pub app: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub now: DateTime<Utc>,
    pub items: &'a [SettleItem<'a>],
}

fn parse_decision(out: &[String], charges: usize, rates: usize) -> Decision {
    match out.first().map(String::as_str) {
        Some("missing") => Decision::Missing,
        Some("disabled") => Decision::Disabled,
        Some("revoked") => Decision::Revoked,
        Some("rate_limited") => Decision::RateLimited {
            name: out.get(1).cloned().unwrap_or_default(),
            retry_after_ms: num(out, 2),
        },
        Some("quota_exceeded") => Decision::QuotaExceeded {
            quota_type: out.get(1).cloned().unwrap_or_default(),
            limit: num(out, 2),
            used: num(out, 3),
            resets_at_ms: num(out, 4),
        },
        _ => {
            let mut charged = Vec::with_capacity(charges);
            for i in 0..charges {
                let at = 2 + i * 6;
                charged.push(Charged {
                    limit: num(out, at),
                    remaining: num(out, at + 1),
                    resets_at_ms: num(out, at + 2),
                    taken: num(out, at + 3),
                    window_start_ms: num(out, at + 4),
                    entry_id: out.get(at + 5).cloned().unwrap_or_default(),
                });
            }
            let base = 2 + charges * 6;
            let rates = (0..rates)
                .map(|i| (num(out, base + i * 2), num(out, base + i * 2 + 1)))
                .collect();
            Decision::Admitted {
                plan: out.get(1).cloned().unwrap_or_default(),
                charged,
                rates,
            }
        }
    }
}
