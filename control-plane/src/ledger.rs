//! Drains the sidecars' usage streams (one per shard, `tollgate_common::keys::Keys::usage_stream`)
//! into the usage ledger with a Redis consumer group: entries are inserted by event id (a
//! redelivery is ignored), acknowledged and deleted only after the commit, and pending entries of a
//! consumer that died are claimed by another. Several replicas drain side by side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use fred::prelude::*;
use futures_util::StreamExt;
use tollgate_common::keys::{Keys, SHARDS};
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::redis::RedisClient;

pub const GROUP: &str = "tollgate-ledger";
/// Entries pending this long with a consumer are presumed orphaned and claimed.
const CLAIM_IDLE_MS: u64 = 5_000;
const BATCH: u64 = 500;
const PARALLEL: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

#[derive(Clone)]
pub struct Drainer {
    db: Pool,
    redis: RedisClient,
    keys: Keys,
    consumer: String,
    metrics: Arc<Metrics>,
}

type Entry = (String, HashMap<String, String>);

enum Parsed {
    Use(db::usage::Event),
    Refund(Uuid),
    Malformed,
}

fn parse(fields: &HashMap<String, String>) -> Parsed {
    let get = |k: &str| fields.get(k).map(String::as_str);
    let event = get("e").and_then(|e| e.parse::<Uuid>().ok());
    match (get("k"), event) {
        (Some("refund"), Some(id)) => Parsed::Refund(id),
        (Some("use"), Some(event_id)) => {
            let parsed = (|| {
                Some(db::usage::Event {
                    event_id,
                    user_id: get("u")?.parse().ok()?,
                    app: get("a")?.to_owned(),
                    quota_type: get("t")?.to_owned(),
                    amount: get("n")?.parse().ok()?,
                    method: get("m")?.to_owned(),
                    path: get("p")?.to_owned(),
                    at: chrono::DateTime::from_timestamp_millis(get("ts")?.parse().ok()?)?,
                })
            })();
            parsed.map_or(Parsed::Malformed, Parsed::Use)
        }
        _ => Parsed::Malformed,
    }
}

impl Drainer {
    pub fn new(db: Pool, redis: RedisClient, keys: Keys, metrics: Arc<Metrics>) -> Drainer {
        let consumer = format!(
            "{}-{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "cp".to_owned()),
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        Drainer {
            db,
            redis,
            keys,
            consumer,
            metrics,
        }
    }

    fn streams(&self) -> impl Iterator<Item = String> + '_ {
        (0..SHARDS).map(|shard| self.keys.usage_stream(shard))
    }

    async fn ensure_group(&self, stream: &str) -> Result<(), Error> {
        match self
            .redis
            .xgroup_create::<(), _, _, _>(stream, GROUP, "0", true)
            .await
        {
            Err(e) if !e.details().starts_with("BUSYGROUP") => Err(e),
            _ => Ok(()),
        }
    }

    /// Creates the consumer group on every shard's stream (idempotent).
    pub async fn ensure_groups(&self) -> Result<(), Error> {
        let results: Vec<Result<(), Error>> = futures_util::stream::iter(self.streams())
            .map(|s| async move { self.ensure_group(&s).await })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Reads new entries from one stream; recreates the group if Redis lost it.
    async fn read(&self, stream: &str) -> Result<Vec<Entry>, Error> {
        let read = self
            .redis
            .xreadgroup::<Value, _, _, _, _>(
                GROUP,
                self.consumer.as_str(),
                Some(BATCH),
                None,
                false,
                stream,
                ">",
            )
            .await;
        match read {
            // `[[stream, [[id, [field, value, ...]], ...]]]`, or nil when there is nothing new.
            Ok(Value::Array(streams)) => Ok(streams
                .into_iter()
                .flat_map(|s| match s {
                    Value::Array(mut pair) if pair.len() == 2 => entries(pair.swap_remove(1)),
                    _ => Vec::new(),
                })
                .collect()),
            Ok(_) => Ok(Vec::new()),
            Err(e) if e.details().starts_with("NOGROUP") => {
                self.ensure_group(stream).await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Claims entries another consumer has held too long.
    async fn claim(&self, stream: &str) -> Result<Vec<Entry>, Error> {
        let value: Value = match self
            .redis
            .xautoclaim(
                stream,
                GROUP,
                self.consumer.as_str(),
                CLAIM_IDLE_MS,
                "0-0",
                Some(BATCH),
                false,
            )
            .await
        {
            Ok(v) => v,
            Err(e) if e.details().starts_with("NOGROUP") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(entries_of_autoclaim(value))
    }

    /// Records everything one pass read, from every stream, in one transaction; then acknowledges
    /// and deletes it.
    async fn ingest(&self, batches: Vec<(String, Vec<Entry>)>) -> Result<usize, LedgerError> {
        let batches: Vec<(String, Vec<Entry>)> =
            batches.into_iter().filter(|(_, e)| !e.is_empty()).collect();
        if batches.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::new();
        let mut refunds = Vec::new();
        let mut malformed = 0u64;
        let mut oldest_ms = i64::MAX;
        for (_, fields) in batches.iter().flat_map(|(_, entries)| entries) {
            match parse(fields) {
                Parsed::Use(e) => {
                    oldest_ms = oldest_ms.min(e.at.timestamp_millis());
                    events.push(e);
                }
                Parsed::Refund(id) => refunds.push(id),
                Parsed::Malformed => malformed += 1,
            }
        }
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(DbError::op("begin ledger batch"))?;
        let inserted = db::usage::record(&tx, &events, &refunds).await?;
        tx.commit()
            .await
            .map_err(DbError::op("commit ledger batch"))?;
        // Only now: a crash before this redelivers, and the event id makes that harmless.
        let acks: Vec<Result<usize, Error>> = futures_util::stream::iter(batches)
            .map(|(stream, entries)| async move {
                let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
                let n = ids.len();
                let _: () = self.redis.xack(stream.as_str(), GROUP, ids.clone()).await?;
                let _: () = self.redis.xdel(stream.as_str(), ids).await?;
                Ok(n)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut total = 0;
        for ack in acks {
            total += ack?;
        }
        let m = &self.metrics;
        m.usage_ingested
            .with_label_values(&["use"])
            .inc_by(events.len() as u64);
        m.usage_ingested
            .with_label_values(&["refund"])
            .inc_by(refunds.len() as u64);
        m.usage_ingested
            .with_label_values(&["malformed"])
            .inc_by(malformed);
        let dropped = events.len() as u64 - inserted.min(events.len() as u64);
        m.usage_ingested
            .with_label_values(&["duplicate_or_unknown"])
            .inc_by(dropped);
        if oldest_ms != i64::MAX {
            let lag = (chrono::Utc::now().timestamp_millis() - oldest_ms).max(0) as f64 / 1000.0;
            m.usage_lag.set(lag);
        }
        Ok(total)
    }

    /// One pass over every shard — new entries, and (when `claim`) orphaned ones — ingested in
    /// one transaction. Returns how many entries it took and whether any stream had more waiting.
    pub async fn pass(&self, claim: bool) -> Result<(usize, bool), LedgerError> {
        let reads: Vec<Result<(String, Vec<Entry>), LedgerError>> =
            futures_util::stream::iter(self.streams())
                .map(|stream| async move {
                    let mut entries = if claim {
                        self.claim(&stream).await?
                    } else {
                        Vec::new()
                    };
                    entries.extend(self.read(&stream).await?);
                    Ok((stream, entries))
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        let mut batches = Vec::new();
        let mut more = false;
        for read in reads {
            let (stream, entries) = read?;
            more |= entries.len() as u64 >= BATCH;
            batches.push((stream, entries));
        }
        Ok((self.ingest(batches).await?, more))
    }

    /// Entries waiting in all streams.
    pub async fn backlog(&self) -> Result<u64, Error> {
        let lens: Vec<Result<u64, Error>> = futures_util::stream::iter(self.streams())
            .map(|s| async move { self.redis.xlen::<u64, _>(s).await })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        lens.into_iter().sum()
    }

    pub async fn run(self) {
        while let Err(e) = self.ensure_groups().await {
            tracing::warn!(error = %e, "cannot create the ledger consumer groups yet");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut last_claim = tokio::time::Instant::now();
        let mut last_backlog = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            let claim = last_claim.elapsed() >= Duration::from_millis(CLAIM_IDLE_MS / 3);
            if claim {
                last_claim = tokio::time::Instant::now();
            }
            let (drained, more) = match self.pass(claim).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::warn!(error = %e, "ledger pass failed; will retry");
                    (0, false)
                }
            };
            if last_backlog.elapsed() >= Duration::from_secs(5) {
                if let Ok(n) = self.backlog().await {
                    self.metrics.usage_backlog.set(n as i64);
                    if n == 0 {
                        self.metrics.usage_lag.set(0.0);
                    }
                }
                last_backlog = tokio::time::Instant::now();
            }
            // Straight on only while a stream has a full batch waiting; otherwise let events
            // gather, so that each pass (1,024 reads) and transaction carries more of them.
            if !more {
                let pause = if drained == 0 { 250 } else { 100 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

/// `XAUTOCLAIM` answers `[next-id, [[id, [field, value, ...]], ...], [deleted ids]]`.
fn entries_of_autoclaim(value: Value) -> Vec<Entry> {
    let Value::Array(mut parts) = value else {
        return Vec::new();
    };
    if parts.len() < 2 {
        return Vec::new();
    }
    entries(parts.swap_remove(1))
}

/// `[[id, [field, value, ...]], ...]`; entries deleted meanwhile come with nil fields and are
/// skipped.
fn entries(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = pair.pop()?.as_string()?;
            let Value::Array(flat) = fields else {
                return None;
            };
            let mut map = HashMap::new();
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                map.insert(k.as_string()?, v.as_string()?);
            }
            Some((id, map))
        })
        .collect()
}
