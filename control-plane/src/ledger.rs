//! Drains the sidecars' usage buckets (one Redis hash per shard and minute,
//! `tollgate_common::keys::Keys::bucket`) into the usage ledger once their minute has closed.
//!
//! A pass stages each closed bucket (`lua/drain_claim.lua` renames it, stamped with the pass's
//! id), records every staged bucket of every shard in one PostgreSQL transaction (each stamp
//! once: `db::usage::record`), and deletes the staged buckets only after the commit
//! (`lua/drain_done.lua`). A pass that dies anywhere is repeated by the next one, by this replica
//! or another, and adds nothing twice; several replicas drain side by side. The cost follows the
//! number of buckets (users × routes active per minute), not the number of requests.
//!
//! A minute can still change after it closed: a refund of a call decided in it subtracts from
//! its bucket (a new one, if it was drained). Every pass therefore looks back over the last
//! minutes too, and once a minute every `lookback`; the catch-up point after an outage is kept in
//! PostgreSQL (`usage_drain_cursor`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::StreamExt;
use tollgate_common::keys::{BUCKET_MS, Keys, SHARDS, bucket_field, bucket_start};
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::redis::RedisClient;

static CLAIM: &str = include_str!("../../lua/drain_claim.lua");
static DONE: &str = include_str!("../../lua/drain_done.lua");

/// Redis calls in flight at once during a pass.
const PARALLEL: usize = 64;
/// Minutes one claim call stages (keys of one shard, so one slot).
const MINUTES_PER_CALL: usize = 30;
/// A regular pass looks this far back behind the newest closed minute.
const RECENT_MS: i64 = 3 * BUCKET_MS;
/// Shards recorded in one transaction: what one pass holds in memory is bounded by this many
/// shards' buckets of `MINUTES_PER_CALL` minutes.
const SHARDS_PER_TX: u16 = 64;
/// A bucket another pass staged is left to it this long before this one takes it over.
const PATIENCE_MS: i64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

/// When buckets are drained; see docs/configuration.md.
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// How long after its minute ends a bucket is drained: the clock skew allowed between
    /// sidecars and the control plane.
    pub close_grace: Duration,
    /// How far back passes look for late changes (refunds) and, after an outage, at most how
    /// far back the first pass starts; must exceed the sidecars' upstream timeout plus their
    /// settle window.
    pub lookback: Duration,
    /// Pause between passes.
    pub every: Duration,
    /// Minute rows older than this are deleted (month rows are kept).
    pub minute_retention: Duration,
}

impl Default for DrainSettings {
    fn default() -> DrainSettings {
        DrainSettings {
            close_grace: Duration::from_secs(10),
            lookback: Duration::from_secs(15 * 60),
            every: Duration::from_secs(5),
            minute_retention: Duration::from_secs(35 * 24 * 3600),
        }
    }
}

#[derive(Clone)]
pub struct Drainer {
    db: Pool,
    redis: RedisClient,
    keys: Keys,
    metrics: Arc<Metrics>,
    settings: DrainSettings,
    claim: Script,
    done: Script,
}

/// One staged bucket as read: which shard and minute, its stamp, its fields.
struct Staged {
    shard: u16,
    minute_ms: i64,
    stamp: String,
    fields: HashMap<String, String>,
}

/// What a pass has staged: the buckets, and the ledger entries they make.
#[derive(Default)]
pub struct Staging {
    buckets: Vec<Staged>,
    /// Every staged bucket read, valid stamps only.
    ids: Vec<db::usage::StagedId>,
    entries: Vec<(db::usage::StagedId, db::usage::Bucket)>,
    malformed: usize,
}

impl Staging {
    /// Staged buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Staged buckets recorded and deleted.
    pub buckets: usize,
    pub recorded: db::usage::Recorded,
    pub malformed: usize,
}

impl Drainer {
    pub fn new(
        db: Pool,
        redis: RedisClient,
        keys: Keys,
        metrics: Arc<Metrics>,
        settings: DrainSettings,
    ) -> Drainer {
        Drainer {
            db,
            redis,
            keys,
            metrics,
            settings,
            claim: Script::from_lua(CLAIM),
            done: Script::from_lua(DONE),
        }
    }

    /// The newest minute (start, ms) that has closed at `now_ms`.
    fn last_closed(&self, now_ms: i64) -> i64 {
        bucket_start(now_ms - self.settings.close_grace.as_millis() as i64) - BUCKET_MS
    }

    /// Stages one shard's buckets of `minutes` (one slot, one call per slice of minutes).
    async fn claim_shard(
        &self,
        shard: u16,
        minutes: &[i64],
        stamp: &str,
        now_ms: i64,
    ) -> Result<Vec<Staged>, Error> {
        let mut out = Vec::new();
        for slice in minutes.chunks(MINUTES_PER_CALL) {
            let keys: Vec<String> = slice
                .iter()
                .flat_map(|m| {
                    [
                        self.keys.bucket(shard, *m),
                        self.keys.bucket_staging(shard, *m),
                    ]
                })
                .collect();
            let reply: Value = self
                .claim
                .evalsha_with_reload(
                    &self.redis,
                    keys,
                    vec![
                        stamp.to_owned(),
                        now_ms.to_string(),
                        PATIENCE_MS.to_string(),
                    ],
                )
                .await?;
            let Value::Array(items) = reply else { continue };
            for item in items {
                let Value::Array(mut parts) = item else {
                    continue;
                };
                if parts.len() != 3 {
                    continue;
                }
                let fields = flat_map(parts.pop());
                let stamp = parts.pop().and_then(|v| v.as_string()).unwrap_or_default();
                let index = parts.pop().and_then(|v| v.as_i64()).unwrap_or(0);
                let Some(minute_ms) = usize::try_from(index - 1).ok().and_then(|i| slice.get(i))
                else {
                    continue;
                };
                out.push(Staged {
                    shard,
                    minute_ms: *minute_ms,
                    stamp,
                    fields,
                });
            }
        }
        Ok(out)
    }

    /// One pass over every shard for the closed minutes from `from_ms` (inclusive) to the newest
    /// closed one at `now_ms`, oldest minutes first, a group of shards at a time (starting at a
    /// random one, so replicas spread out): stage, record in one transaction, delete what was
    /// recorded.
    pub async fn pass_from(&self, from_ms: i64, now_ms: i64) -> Result<Pass, LedgerError> {
        let last = self.last_closed(now_ms);
        let minutes: Vec<i64> = (0..)
            .map(|i| bucket_start(from_ms) + i * BUCKET_MS)
            .take_while(|m| *m <= last)
            .collect();
        let offset = (Uuid::new_v4().as_u128() % u128::from(SHARDS)) as u16;
        let mut total = Pass::default();
        for slice in minutes.chunks(MINUTES_PER_CALL) {
            for group in 0..SHARDS.div_ceil(SHARDS_PER_TX) {
                let shards: Vec<u16> = (0..SHARDS_PER_TX)
                    .map(|i| (offset + group * SHARDS_PER_TX + i) % SHARDS)
                    .collect();
                let staging = self.stage_shards(&shards, slice, now_ms).await?;
                if staging.buckets.is_empty() {
                    continue;
                }
                let recorded = self.record(&staging).await?;
                self.finish(&staging).await?;
                total.buckets += staging.buckets.len();
                total.malformed += staging.malformed;
                total.recorded.applied += recorded.applied;
                total.recorded.duplicate += recorded.duplicate;
                total.recorded.dropped += recorded.dropped;
            }
        }
        self.metrics.usage_backlog.set(0);
        Ok(total)
    }

    /// Step 1 of a pass: stages the closed buckets of every shard from `from_ms` on and reads
    /// them (and any an earlier pass left staged and gave up on).
    pub async fn stage(&self, from_ms: i64, now_ms: i64) -> Result<Staging, LedgerError> {
        let last = self.last_closed(now_ms);
        let minutes: Vec<i64> = (0..)
            .map(|i| bucket_start(from_ms) + i * BUCKET_MS)
            .take_while(|m| *m <= last)
            .collect();
        let shards: Vec<u16> = (0..SHARDS).collect();
        self.stage_shards(&shards, &minutes, now_ms).await
    }

    async fn stage_shards(
        &self,
        shards: &[u16],
        minutes: &[i64],
        now_ms: i64,
    ) -> Result<Staging, LedgerError> {
        if minutes.is_empty() {
            return Ok(Staging::default());
        }
        let stamp = Uuid::new_v4().to_string();
        let claims: Vec<Result<Vec<Staged>, Error>> =
            futures_util::stream::iter(shards.iter().copied())
                .map(|shard| {
                    let stamp = &stamp;
                    async move { self.claim_shard(shard, minutes, stamp, now_ms).await }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        let mut buckets = Vec::new();
        for claim in claims {
            buckets.extend(claim?);
        }
        self.metrics.usage_backlog.set(buckets.len() as i64);
        let (ids, entries, malformed) = entries_of(&buckets);
        Ok(Staging {
            buckets,
            ids,
            entries,
            malformed,
        })
    }

    /// Step 2: records what was staged in one transaction (each stamp once).
    pub async fn record(&self, staging: &Staging) -> Result<db::usage::Recorded, LedgerError> {
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(DbError::op("begin usage drain"))?;
        let recorded = db::usage::record(&tx, &staging.ids, &staging.entries).await?;
        tx.commit()
            .await
            .map_err(DbError::op("commit usage drain"))?;
        let m = &self.metrics;
        let count = |kind: &str, n: u64| m.usage_drained.with_label_values(&[kind]).inc_by(n);
        count("applied", recorded.applied as u64 - recorded.dropped);
        count("duplicate", recorded.duplicate as u64);
        count("dropped", recorded.dropped);
        count("malformed", staging.malformed as u64);
        Ok(recorded)
    }

    /// Step 3, only after step 2 committed: deletes the staged buckets (a crash before this
    /// leaves them for the next pass, and their stamps make that harmless).
    pub async fn finish(&self, staging: &Staging) -> Result<(), LedgerError> {
        let mut by_shard: HashMap<u16, (Vec<String>, Vec<String>)> = HashMap::new();
        for s in &staging.buckets {
            let (keys, stamps) = by_shard.entry(s.shard).or_default();
            keys.push(self.keys.bucket_staging(s.shard, s.minute_ms));
            stamps.push(s.stamp.clone());
        }
        let deletes: Vec<Result<i64, Error>> = futures_util::stream::iter(by_shard)
            .map(|(_, (keys, stamps))| async move {
                self.done
                    .evalsha_with_reload::<i64, _, _>(&self.redis, keys, stamps)
                    .await
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for delete in deletes {
            delete?;
        }
        Ok(())
    }

    /// A regular pass (the last few closed minutes), or with `full` one from the catch-up point
    /// or `lookback` ago, whichever is earlier, which then moves the catch-up point on.
    pub async fn pass(&self, full: bool) -> Result<Pass, LedgerError> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let last = self.last_closed(now_ms);
        if !full {
            let pass = self.pass_from(last - RECENT_MS, now_ms).await?;
            self.set_lag(now_ms, last);
            return Ok(pass);
        }
        let lookback = now - self.settings.lookback;
        let client = self.db.get().await.map_err(DbError::from)?;
        let cursor = db::usage::drain_cursor(&**client)
            .await?
            .unwrap_or(lookback);
        drop(client);
        let from = cursor.min(lookback);
        let pass = self.pass_from(from.timestamp_millis(), now_ms).await?;
        let client = self.db.get().await.map_err(DbError::from)?;
        db::usage::advance_drain_cursor(&**client, minute(lookback.timestamp_millis())).await?;
        self.set_lag(now_ms, last);
        Ok(pass)
    }

    /// How old the newest minute known to be drained is, once a pass has committed.
    fn set_lag(&self, now_ms: i64, last: i64) {
        let lag = (now_ms - (last + BUCKET_MS)).max(0) as f64 / 1000.0;
        self.metrics.usage_lag.set(lag);
    }

    /// Deletes minute rows past their retention and drain stamps no staged bucket can carry any
    /// more.
    pub async fn prune(&self) -> Result<(u64, u64), LedgerError> {
        let now = Utc::now();
        let client = self.db.get().await.map_err(DbError::from)?;
        let retention = chrono::Duration::from_std(self.settings.minute_retention)
            .unwrap_or(chrono::Duration::days(35));
        Ok(db::usage::prune(&**client, now - retention, now - chrono::Duration::days(1)).await?)
    }

    pub async fn run(self) {
        let mut last_full = None::<tokio::time::Instant>;
        let mut last_prune = tokio::time::Instant::now();
        loop {
            let full = last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            match self.pass(full).await {
                Ok(_) if full => last_full = Some(tokio::time::Instant::now()),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "usage drain pass failed; will retry"),
            }
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                match self.prune().await {
                    Ok((minutes, stamps)) => {
                        tracing::info!(minutes, stamps, "pruned old usage minute rows")
                    }
                    Err(e) => tracing::warn!(error = %e, "pruning usage rows failed; will retry"),
                }
                last_prune = tokio::time::Instant::now();
            }
            tokio::time::sleep(self.settings.every).await;
        }
    }
}

fn minute(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(bucket_start(ms)).unwrap_or_default()
}

/// `[field, value, field, value, ...]` as a map.
fn flat_map(value: Option<Value>) -> HashMap<String, String> {
    let Some(Value::Array(flat)) = value else {
        return HashMap::new();
    };
    let mut map = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (k.as_string(), v.as_string()) {
            map.insert(k, v);
        }
    }
    map
}

/// The ids of staged buckets and the ledger entries they hold (amount and calls of each user,
/// app, type and route joined), each with its bucket's id; and how many fields were malformed.
#[allow(clippy::type_complexity)]
fn entries_of(
    staged: &[Staged],
) -> (
    Vec<db::usage::StagedId>,
    Vec<(db::usage::StagedId, db::usage::Bucket)>,
    usize,
) {
    // (bucket, user, app, quota type, route) → (amount, calls)
    type Key = (db::usage::StagedId, Uuid, String, String, String);
    let mut out: HashMap<Key, (i64, i64)> = HashMap::new();
    let mut ids = Vec::with_capacity(staged.len());
    let mut malformed = 0;
    for s in staged {
        let Ok(stamp) = s.stamp.parse::<Uuid>() else {
            malformed += s.fields.len();
            continue;
        };
        let id = (stamp, s.shard as i16, minute(s.minute_ms));
        ids.push(id);
        for (field, value) in &s.fields {
            if field.starts_with('_') {
                // The staging stamp and time.
                continue;
            }
            let (Some(f), Ok(n)) = (bucket_field::parse(field), value.parse::<i64>()) else {
                malformed += 1;
                continue;
            };
            let key = (
                id,
                f.user,
                f.app.to_owned(),
                f.quota_type.to_owned(),
                f.route.to_owned(),
            );
            let entry = out.entry(key).or_default();
            if f.amount {
                entry.0 += n;
            } else {
                entry.1 += n;
            }
        }
    }
    let entries = out
        .into_iter()
        .filter(|(_, (amount, calls))| *amount != 0 || *calls != 0)
        .map(|((id, user_id, app, quota_type, route), (amount, calls))| {
            (
                id,
                db::usage::Bucket {
                    user_id,
                    minute: id.2,
                    app,
                    quota_type,
                    route,
                    amount,
                    calls,
                },
            )
        })
        .collect();
    (ids, entries, malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_fields_become_entries() {
        let user = Uuid::new_v4();
        let stamp = Uuid::new_v4();
        let suffix = bucket_field::suffix("idoctor", "api_calls_l3_detect", "POST /l3/{patient}");
        let fields: HashMap<String, String> = [
            (format!("a:{user}|{suffix}"), "6"),
            (format!("n:{user}|{suffix}"), "2"),
            // A refunded call and its amount net to nothing and are left out.
            (format!("a:{user}|idoctor|storage_bytes|POST /upload"), "0"),
            (format!("n:{user}|idoctor|storage_bytes|POST /upload"), "0"),
            ("_id".to_owned(), "ignored"),
            ("junk".to_owned(), "1"),
            (format!("n:{user}|{suffix}x"), "not a number"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        let staged = [Staged {
            shard: 3,
            minute_ms: 1_700_000_040_000,
            stamp: stamp.to_string(),
            fields,
        }];
        let (ids, entries, malformed) = entries_of(&staged);
        assert_eq!(malformed, 2);
        let id = (stamp, 3, minute(1_700_000_040_000));
        assert_eq!(ids, vec![id]);
        assert_eq!(
            entries,
            vec![(
                id,
                db::usage::Bucket {
                    user_id: user,
                    minute: minute(1_700_000_040_000),
                    app: "idoctor".to_owned(),
                    quota_type: "api_calls_l3_detect".to_owned(),
                    route: "POST /l3/{patient}".to_owned(),
                    amount: 6,
                    calls: 2,
                }
            )]
        );
    }
}
