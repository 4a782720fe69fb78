//! The usage ledger: one row per admitted, successful metered request, keyed by the event id the
//! sidecar generated, so a redelivered event is ignored and a refunded one ends up absent.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::DbError;

/// A usage event as drained from a sidecar stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub app: String,
    pub quota_type: String,
    pub amount: i64,
    pub method: String,
    pub path: String,
    pub at: DateTime<Utc>,
}

/// Records a batch of usage events and refunds in one transaction; returns how many rows were
/// inserted. Events for an unknown user or quota type are dropped (and counted by the caller),
/// never allowed to block the stream.
pub async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    events: &[Event],
    refunds: &[Uuid],
) -> Result<u64, DbError> {
    // Advisory locks serialise an event with its refund across replicas: one lock per bucket
    // of event ids (at most 256 per transaction, however large the batch, so PostgreSQL's lock
    // table never fills), taken in a fixed order so two batches never deadlock.
    let mut buckets: Vec<i32> = events
        .iter()
        .map(|e| e.event_id)
        .chain(refunds.iter().copied())
        .map(|id| (id.as_u128() % 256) as i32)
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    // A plain scan of the sorted array takes the locks in its order.
    tx.execute(
        "SELECT pg_advisory_xact_lock(7478, b) FROM unnest($1::int4[]) AS t(b)",
        &[&buckets],
    )
    .await
    .map_err(DbError::op("lock usage events"))?;
    if !refunds.is_empty() {
        tx.execute(
            "INSERT INTO usage_refunds (event_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
            &[&refunds],
        )
        .await
        .map_err(DbError::op("record refunds"))?;
        tx.execute(
            "DELETE FROM usage_events WHERE event_id = ANY($1)",
            &[&refunds],
        )
        .await
        .map_err(DbError::op("delete refunded events"))?;
    }
    if events.is_empty() {
        return Ok(0);
    }
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let users: Vec<Uuid> = events.iter().map(|e| e.user_id).collect();
    let apps: Vec<&str> = events.iter().map(|e| e.app.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.quota_type.as_str()).collect();
    let amounts: Vec<i64> = events.iter().map(|e| e.amount).collect();
    let methods: Vec<&str> = events.iter().map(|e| e.method.as_str()).collect();
    let paths: Vec<&str> = events.iter().map(|e| e.path.as_str()).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
    let inserted = tx
        .execute(
            "INSERT INTO usage_events (event_id, user_id, app_id, quota_key, amount, method, path, created_at)
             SELECT e.* FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                                    $6::text[], $7::text[], $8::timestamptz[])
                  AS e(event_id, user_id, app_id, quota_key, amount, method, path, created_at)
             WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = e.user_id)
               AND EXISTS (SELECT 1 FROM quota_types q WHERE q.app_id = e.app_id AND q.key = e.quota_key)
               AND NOT EXISTS (SELECT 1 FROM usage_refunds r WHERE r.event_id = e.event_id)
               AND e.amount >= 0 AND length(e.method) BETWEEN 1 AND 16
             ON CONFLICT (event_id) DO NOTHING",
            &[&event_ids, &users, &apps, &types, &amounts, &methods, &paths, &times],
        )
        .await
        .map_err(DbError::op("insert usage events"))?;
    Ok(inserted)
}

/// One ledger row as `GET /v1/usage` shows it.
#[derive(Debug, Clone)]
pub struct UsageRow {
    pub id: i64,
    pub app: String,
    pub quota_type: String,
    pub amount: i64,
    pub method: String,
    pub path: String,
    pub status: Option<i16>,
    pub created_at: DateTime<Utc>,
}

pub struct UsageQuery<'a> {
    pub user: Uuid,
    pub app: Option<&'a str>,
    pub quota_type: Option<&'a str>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Keyset: rows strictly older than this (created_at, id).
    pub before: Option<(DateTime<Utc>, i64)>,
    pub limit: i64,
}

/// A page of a user's usage, newest first.
pub async fn page(
    client: &impl tokio_postgres::GenericClient,
    q: &UsageQuery<'_>,
) -> Result<Vec<UsageRow>, DbError> {
    let (before_time, before_id) = q.before.unzip();
    let rows = client
        .query(
            "SELECT id, app_id, quota_key, amount, method, path, status, created_at
             FROM usage_events
             WHERE user_id = $1
               AND ($2::text IS NULL OR app_id = $2)
               AND ($3::text IS NULL OR quota_key = $3)
               AND ($4::timestamptz IS NULL OR created_at >= $4)
               AND ($5::timestamptz IS NULL OR created_at < $5)
               AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7))
             ORDER BY created_at DESC, id DESC
             LIMIT $8",
            &[
                &q.user,
                &q.app,
                &q.quota_type,
                &q.from,
                &q.to,
                &before_time,
                &before_id,
                &q.limit,
            ],
        )
        .await
        .map_err(DbError::op("read usage"))?;
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            id: r.get(0),
            app: r.get(1),
            quota_type: r.get(2),
            amount: r.get(3),
            method: r.get(4),
            path: r.get(5),
            status: r.get(6),
            created_at: r.get(7),
        })
        .collect())
}

/// What the ledger says a user used of one quota type since `since` (after the window's start
/// and any admin reset in it): the basis for rebuilding a lost counter.
pub async fn used_since(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    app: &str,
    quota_type: &str,
    window_start: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT COALESCE(sum(e.amount), 0)::bigint
             FROM usage_events e
             WHERE e.user_id = $1 AND e.app_id = $2 AND e.quota_key = $3
               AND e.created_at >= GREATEST($4, COALESCE(
                   (SELECT max(r.reset_at) FROM quota_resets r
                    JOIN quota_types qt ON qt.id = r.quota_type_id
                    WHERE r.user_id = $1 AND qt.app_id = $2 AND qt.key = $3 AND r.window_start = $4),
                   $4))",
            &[&user, &app, &quota_type, &window_start],
        )
        .await
        .map_err(DbError::op("sum usage"))?;
    Ok(row.get(0))
}
