//! API keys, stored only as SHA-256 hashes.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, prefix, created_at, last_used_at, expires_at, revoked_at";

impl ApiKeyRow {
    fn from_row(r: &tokio_postgres::Row) -> ApiKeyRow {
        ApiKeyRow {
            id: r.get("id"),
            name: r.get("name"),
            prefix: r.get("prefix"),
            created_at: r.get("created_at"),
            last_used_at: r.get("last_used_at"),
            expires_at: r.get("expires_at"),
            revoked_at: r.get("revoked_at"),
        }
    }
}

pub async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    name: &str,
    prefix: &str,
    hash: &[u8; 32],
    expires_at: Option<DateTime<Utc>>,
) -> Result<ApiKeyRow, DbError> {
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO api_keys (user_id, name, prefix, key_hash, expires_at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
            ),
            &[&user, &name, &prefix, &hash.as_slice(), &expires_at],
        )
        .await
        .map_err(DbError::op("insert api key"))?;
    Ok(ApiKeyRow::from_row(&row))
}

pub async fn list(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
) -> Result<Vec<ApiKeyRow>, DbError> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at, id"),
            &[&user],
        )
        .await
        .map_err(DbError::op("list api keys"))?;
    Ok(rows.iter().map(ApiKeyRow::from_row).collect())
}

/// Revokes one of the user's keys; `false` if the user has no such key. Revoking twice is fine.
pub async fn revoke(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    id: Uuid,
) -> Result<bool, DbError> {
    let n = tx
        .execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
             WHERE id = $1 AND user_id = $2",
            &[&id, &user],
        )
        .await
        .map_err(DbError::op("revoke api key"))?;
    Ok(n == 1)
}

/// The owner of a live key (not revoked, not expired), by hash.
pub async fn owner(
    client: &impl tokio_postgres::GenericClient,
    hash: &[u8; 32],
) -> Result<Option<(Uuid, Uuid)>, DbError> {
    let row = client
        .query_opt(
            "SELECT id, user_id FROM api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
            &[&hash.as_slice()],
        )
        .await
        .map_err(DbError::op("look up api key"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// What the sidecars need of one key: its hash, owner and expiry (seconds, 0 = never), and
/// whether it is live.
pub struct KeySync {
    pub id: Uuid,
    pub hash: Vec<u8>,
    pub user_id: Uuid,
    pub expires_at: i64,
    pub live: bool,
}

const SYNC_SELECT: &str = "SELECT id, key_hash, user_id,
        COALESCE(extract(epoch FROM expires_at)::bigint, 0) AS exp,
        revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) AS live
     FROM api_keys";

fn key_sync(r: &tokio_postgres::Row) -> KeySync {
    KeySync {
        id: r.get(0),
        hash: r.get(1),
        user_id: r.get(2),
        expires_at: r.get(3),
        live: r.get(4),
    }
}

pub async fn for_sync(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
) -> Result<Option<KeySync>, DbError> {
    let row = client
        .query_opt(&format!("{SYNC_SELECT} WHERE id = $1"), &[&id])
        .await
        .map_err(DbError::op("read api key for sync"))?;
    Ok(row.as_ref().map(key_sync))
}

/// Live keys of active users, a batch at a time in id order (reconcile).
pub async fn live_batch(
    client: &impl tokio_postgres::GenericClient,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<KeySync>, DbError> {
    let rows = client
        .query(
            &format!(
                "{SYNC_SELECT} WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                   AND ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
            ),
            &[&after, &limit],
        )
        .await
        .map_err(DbError::op("read live api keys"))?;
    Ok(rows.iter().map(key_sync).collect())
}

/// Ids of a user's keys (a status change re-syncs them).
pub async fn ids_of_user(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
) -> Result<Vec<Uuid>, DbError> {
    let rows = client
        .query("SELECT id FROM api_keys WHERE user_id = $1", &[&user])
        .await
        .map_err(DbError::op("list user's api keys"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records last use for a batch of keys; never moves a time backwards.
pub async fn record_last_used(
    client: &impl tokio_postgres::GenericClient,
    uses: &[(Uuid, DateTime<Utc>)],
) -> Result<(), DbError> {
    if uses.is_empty() {
        return Ok(());
    }
    let (ids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) = uses.iter().copied().unzip();
    client
        .execute(
            "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, u.at)
             FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at)
             WHERE k.id = u.id",
            &[&ids, &times],
        )
        .await
        .map_err(DbError::op("record api key use"))?;
    Ok(())
}
