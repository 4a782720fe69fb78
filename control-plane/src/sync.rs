//! Writes into Redis what the sidecars need to decide without asking us: each user's status,
//! role and token cut-off, and each live API key's owner and expiry. Every change goes through the
//! outbox (`db::outbox`) and is announced on the events channel so sidecars drop cached copies;
//! `reconcile` rewrites everything from PostgreSQL, so Redis can be lost and rebuilt.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use fred::interfaces::{ClientLike, EventInterface};
use fred::interfaces::{HashesInterface, KeysInterface, PubsubInterface, SortedSetsInterface};
use fred::types::scan::Scanner;
use fred::types::scripts::Script;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::Notify;
use tollgate_common::api_key;
use tollgate_common::keys::{CacheEvent, Keys, api_key_field, user_field};
use tollgate_common::protocol;
use uuid::Uuid;

use crate::db::outbox::Topic;
use crate::db::{self, DbError};
use crate::redis::RedisClient;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// The hex of a stored key hash (32 bytes), as the Redis key schema names it.
fn api_key_hex(hash: &[u8]) -> String {
    <[u8; 32]>::try_from(hash)
        .map(|h| api_key::hex(&h))
        .unwrap_or_default()
}

#[derive(Clone)]
pub struct Syncer {
    db: Pool,
    pub redis: RedisClient,
    pub keys: Keys,
    kick: Arc<Notify>,
    sync_user_script: Script,
    set_counter_script: Script,
}

static SYNC_USER: &str = include_str!("../../lua/sync_user.lua");
static SET_COUNTER: &str = include_str!("../../lua/set_counter.lua");

const BATCH: i64 = 500;

impl Syncer {
    pub fn new(db: Pool, redis: RedisClient, keys: Keys) -> Syncer {
        Syncer {
            db,
            redis,
            keys,
            kick: Arc::new(Notify::new()),
            sync_user_script: Script::from_lua(SYNC_USER),
            set_counter_script: Script::from_lua(SET_COUNTER),
        }
    }

    /// Wakes the outbox worker now (after a commit that enqueued something).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    async fn publish(&self, event: CacheEvent) -> Result<(), SyncError> {
        self.redis
            .publish::<(), _, _>(self.keys.events_channel(), event.encode())
            .await?;
        Ok(())
    }

    /// Rewrites one user's hash (status, role, token cut-off, plan and effective limits) from
    /// PostgreSQL; `false` if there is no such user.
    pub async fn user(&self, id: Uuid) -> Result<bool, SyncError> {
        let client = self.db.get().await.map_err(DbError::from)?;
        let Some(state) = db::limits::user_state(&**client, id, chrono::Utc::now()).await? else {
            return Ok(false);
        };
        self.write_user(&**client, &state).await?;
        self.publish(CacheEvent::User(id)).await?;
        Ok(true)
    }

    /// Writes the user's hash in one script (`lua/sync_user.lua`), so a sidecar never sees it
    /// half written, no limit of a quota the plan dropped survives, and a counter Redis lost is
    /// rebuilt from the ledger — never one the sidecars are counting in.
    async fn write_user(
        &self,
        client: &impl tokio_postgres::GenericClient,
        state: &db::limits::UserState,
    ) -> Result<(), SyncError> {
        let key = self.keys.user(state.id);
        let counter_fields: Vec<String> = state
            .limits
            .iter()
            .map(|l| user_field::counter(&l.app, &l.quota_type))
            .collect();
        // Only counters that are absent need the ledger's figure.
        let present: Vec<Option<String>> = if counter_fields.is_empty() {
            Vec::new()
        } else {
            self.redis
                .hmget(key.as_str(), counter_fields.clone())
                .await?
        };
        let mut restore = Vec::new();
        for ((limit, field), value) in state.limits.iter().zip(&counter_fields).zip(&present) {
            if value.is_some() {
                continue;
            }
            let used = db::usage::used_in_window(
                client,
                state.id,
                &limit.app,
                &limit.quota_type,
                limit.window,
                limit.window_start,
            )
            .await?;
            restore.push((
                field.clone(),
                user_field::counter_value(used, limit.window_start.timestamp_millis()),
            ));
        }
        let fields = [
            (user_field::STATUS, state.status.clone()),
            (user_field::ROLE, state.role.clone()),
            (
                user_field::TOKENS_VALID_AFTER,
                state.tokens_valid_after.to_string(),
            ),
            (user_field::PLAN, state.plan.clone().unwrap_or_default()),
        ];
        let mut args: Vec<String> = vec![
            user_field::QUOTA_PREFIX.to_owned(),
            (fields.len() + state.limits.len()).to_string(),
        ];
        for (field, value) in fields {
            args.push(field.to_owned());
            args.push(value);
        }
        for limit in &state.limits {
            args.push(user_field::quota(&limit.app, &limit.quota_type));
            args.push(user_field::quota_value(limit.limit, limit.window));
        }
        args.push(restore.len().to_string());
        for (field, value) in restore {
            args.push(field);
            args.push(value);
        }
        let _: i64 = self
            .sync_user_script
            .evalsha_with_reload(&self.redis, vec![key], args)
            .await?;
        Ok(())
    }

    /// An admin reset: the current window's `used` is 0 in Redis. Returns what it cleared, which
    /// the caller records with the reset so that a rebuild honours it.
    pub async fn reset_counter(
        &self,
        user: Uuid,
        limit: &db::limits::Limit,
    ) -> Result<i64, SyncError> {
        let cleared: i64 = self
            .set_counter_script
            .evalsha_with_reload(
                &self.redis,
                vec![self.keys.user(user)],
                vec![
                    user_field::counter(&limit.app, &limit.quota_type),
                    "0".to_owned(),
                    limit.window_start.timestamp_millis().to_string(),
                ],
            )
            .await?;
        self.publish(CacheEvent::User(user)).await?;
        Ok(cleared)
    }

    /// Writes or removes one API key's hash.
    pub async fn api_key(&self, id: Uuid) -> Result<(), SyncError> {
        let client = self.db.get().await.map_err(DbError::from)?;
        let Some(key) = db::api_keys::for_sync(&**client, id).await? else {
            return Ok(());
        };
        let Ok(hash) = <[u8; 32]>::try_from(key.hash.as_slice()) else {
            return Ok(());
        };
        let hex = api_key::hex(&hash);
        if key.live {
            self.write_key(&hex, key.user_id, key.id, key.expires_at)
                .await?;
        } else {
            self.redis.del::<(), _>(self.keys.api_key(&hex)).await?;
        }
        self.publish(CacheEvent::ApiKey(hex)).await
    }

    async fn write_key(
        &self,
        hex: &str,
        user: Uuid,
        key: Uuid,
        expires_at: i64,
    ) -> Result<(), SyncError> {
        self.redis
            .hset::<(), _, _>(
                self.keys.api_key(hex),
                [
                    (api_key_field::USER_ID, user.to_string()),
                    (api_key_field::KEY_ID, key.to_string()),
                    (api_key_field::EXPIRES_AT, expires_at.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Applies pending outbox rows; returns how many.
    pub async fn drain_outbox(&self) -> Result<usize, SyncError> {
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(DbError::op("begin outbox"))?;
        let rows = db::outbox::take(&tx, 100).await?;
        let mut seen = HashSet::new();
        for (_, topic, subject) in &rows {
            if !seen.insert((*topic, subject.clone())) {
                continue;
            }
            match topic {
                Topic::Plan => {
                    let reader = self.db.get().await.map_err(DbError::from)?;
                    let users = db::subscriptions::subscribers(&**reader, subject).await?;
                    for user in users {
                        self.user(user).await?;
                    }
                }
                Topic::User | Topic::ApiKey => {
                    let Ok(id) = subject.parse::<Uuid>() else {
                        continue;
                    };
                    if *topic == Topic::User {
                        self.user(id).await?;
                    } else {
                        self.api_key(id).await?;
                    }
                }
            }
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        db::outbox::done(&tx, &ids).await?;
        tx.commit().await.map_err(DbError::op("commit outbox"))?;
        Ok(rows.len())
    }

    /// Rewrites every user and API key from PostgreSQL and removes key hashes that are no longer
    /// live. Safe to run at any time and on several replicas.
    pub async fn reconcile(&self) -> Result<(), SyncError> {
        let client = self.db.get().await.map_err(DbError::from)?;
        let mut after = None;
        let mut users = 0usize;
        let now = chrono::Utc::now();
        loop {
            let batch = db::users::sync_batch(&**client, after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.0);
            for (id, ..) in &batch {
                if let Some(state) = db::limits::user_state(&**client, *id, now).await? {
                    self.write_user(&**client, &state).await?;
                }
            }
            users += batch.len();
        }
        let mut live = HashSet::new();
        let mut after = None;
        loop {
            let batch = db::api_keys::live_batch(&**client, after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.id);
            for key in &batch {
                let Ok(hash) = <[u8; 32]>::try_from(key.hash.as_slice()) else {
                    continue;
                };
                let hex = api_key::hex(&hash);
                self.write_key(&hex, key.user_id, key.id, key.expires_at)
                    .await?;
                live.insert(self.keys.api_key(&hex));
            }
        }
        // Remove hashes of keys revoked or expired while Redis missed the news.
        let mut stale = Vec::new();
        let pattern = self.keys.api_key_pattern();
        let mut scan = if self.redis.is_clustered() {
            self.redis.scan_cluster(pattern, Some(500), None).boxed()
        } else {
            self.redis.scan(pattern, Some(500), None).boxed()
        };
        while let Some(mut page) = scan.try_next().await? {
            for key in page.take_results().unwrap_or_default() {
                if let Some(name) = key.as_str()
                    && !live.contains(name)
                {
                    stale.push(name.to_owned());
                }
            }
        }
        // A key created after the live list was read is in Redis but not in the list: ask
        // PostgreSQL about each one again, by the key id its record names, so that a record of a
        // live key is never removed (its row commits before its record is written).
        let mut removed = 0usize;
        for name in &stale {
            let key_id: Option<String> = self
                .redis
                .hget(name.as_str(), api_key_field::KEY_ID)
                .await?;
            let still_live = match key_id.and_then(|id| id.parse::<Uuid>().ok()) {
                Some(id) => db::api_keys::for_sync(&**client, id)
                    .await?
                    .is_some_and(|k| k.live && self.keys.api_key(&api_key_hex(&k.hash)) == *name),
                None => false,
            };
            if !still_live {
                self.redis.del::<(), _>(name.as_str()).await?;
                removed += 1;
            }
        }
        // Sidecars drop every cached key and refusal: Redis may have been rebuilt under them
        // (an API key that was unknown a moment ago may be there now).
        self.publish(CacheEvent::All).await?;
        tracing::info!(
            users,
            api_keys = live.len(),
            removed,
            "reconciled redis from postgres"
        );
        Ok(())
    }

    /// Moves API-key last-use times, collected in a Redis sorted set by the control plane and
    /// the sidecars, into PostgreSQL in one batch.
    pub async fn flush_key_use(&self) -> Result<usize, SyncError> {
        let key = self.keys.api_key_last_used();
        let entries: Vec<(String, f64)> = self
            .redis
            .zrange(key.as_str(), 0, 999, None, false, None, true)
            .await?;
        let uses: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = entries
            .iter()
            .filter_map(|(id, at)| {
                Some((
                    id.parse().ok()?,
                    chrono::DateTime::from_timestamp(*at as i64, 0)?,
                ))
            })
            .collect();
        if entries.is_empty() {
            return Ok(0);
        }
        let client = self.db.get().await.map_err(DbError::from)?;
        db::api_keys::record_last_used(&**client, &uses).await?;
        // Remove what was recorded unless a newer use arrived meanwhile (ZREM only if the score is
        // unchanged would need a script; a newer use re-adds the member, so removing by member
        // can lose at most one newer timestamp until the next use).
        let members: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
        self.redis.zrem::<(), _, _>(key.as_str(), members).await?;
        Ok(uses.len())
    }

    /// Notes a use of an API key (batched into PostgreSQL by `flush_key_use`).
    pub async fn note_key_use(&self, key: Uuid) -> Result<(), SyncError> {
        self.redis
            .zadd::<(), _, _>(
                self.keys.api_key_last_used(),
                None,
                Some(fred::types::sorted_sets::Ordering::GreaterThan),
                false,
                false,
                protocol::key_use(key, chrono::Utc::now().timestamp()),
            )
            .await?;
        Ok(())
    }

    /// The background worker: reconcile at start, then drain the outbox when kicked or every
    /// half second, flush key use every 10 s, and reconcile again every `reconcile_every`.
    pub async fn run(self, reconcile_every: Duration) {
        // A reconnect may be to an emptied or replaced Redis: reconcile again at once.
        let mut reconnects = self.redis.reconnect_rx();
        let mut reconciled = false;
        let mut last_reconcile = tokio::time::Instant::now();
        let mut last_flush = tokio::time::Instant::now();
        loop {
            if !reconciled || last_reconcile.elapsed() >= reconcile_every {
                match self.reconcile().await {
                    Ok(()) => {
                        reconciled = true;
                        last_reconcile = tokio::time::Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "reconcile failed; will retry"),
                }
            }
            loop {
                match self.drain_outbox().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox drain failed; will retry");
                        break;
                    }
                }
            }
            if last_flush.elapsed() >= Duration::from_secs(10) {
                if let Err(e) = self.flush_key_use().await {
                    tracing::warn!(error = %e, "recording api key use failed; will retry");
                }
                last_flush = tokio::time::Instant::now();
            }
            tokio::select! {
                () = self.kick.notified() => {},
                () = tokio::time::sleep(Duration::from_millis(500)) => {},
                reconnected = reconnects.recv() => {
                    if reconnected.is_ok() {
                        tracing::info!("redis reconnected; reconciling everything it should hold");
                        reconciled = false;
                    }
                }
            }
        }
    }
}
