//! `Idempotency-Key` records (migration 0005): one row per (user, key), inserted by the
//! transaction that does the request's work and holding its answer once that commits.

use uuid::Uuid;

use super::DbError;

/// How long a key's answer is kept and replayed.
pub const TTL_HOURS: i64 = 24;

/// What claiming a key found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is this transaction's now: do the work, then [`complete`] it.
    New,
    /// The key was used for this same request: its stored answer.
    Replay { status: u16, body: Vec<u8> },
    /// The key was used for another route or another body.
    Mismatch,
}

/// The request a key is claimed for.
pub struct Request<'a> {
    pub user: Uuid,
    pub key: &'a str,
    /// `METHOD /path`, the path as sent (ids included).
    pub request: &'a str,
    /// SHA-256 of the canonical JSON body.
    pub body_hash: &'a [u8],
}

/// Claims `key` inside `tx`. If another transaction holds the same key uncommitted, this waits
/// for it: its commit makes this a replay, its rollback makes this `New`. A record older than
/// the TTL is taken over as if it did not exist.
pub async fn claim(
    tx: &tokio_postgres::Transaction<'_>,
    r: &Request<'_>,
) -> Result<Claim, DbError> {
    let claimed = tx
        .query_opt(
            "INSERT INTO idempotency_keys (user_id, key, request, body_hash)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, key) DO UPDATE
                 SET request = EXCLUDED.request, body_hash = EXCLUDED.body_hash,
                     response_status = NULL, response_body = NULL, created_at = now()
                 WHERE idempotency_keys.created_at <= now() - $5::bigint * interval '1 hour'
             RETURNING 1",
            &[&r.user, &r.key, &r.request, &r.body_hash, &TTL_HOURS],
        )
        .await
        .map_err(DbError::op("claim idempotency key"))?;
    if claimed.is_some() {
        return Ok(Claim::New);
    }
    // A live record committed by another request (READ COMMITTED: this statement sees it).
    let row = tx
        .query_opt(
            "SELECT request, body_hash, response_status, response_body FROM idempotency_keys
             WHERE user_id = $1 AND key = $2",
            &[&r.user, &r.key],
        )
        .await
        .map_err(DbError::op("read idempotency key"))?
        .ok_or_else(|| DbError::Invalid("idempotency key vanished while claimed".to_owned()))?;
    let request: String = row.get(0);
    let body_hash: Option<Vec<u8>> = row.get(1);
    if request != r.request || body_hash.is_some_and(|h| h != r.body_hash) {
        return Ok(Claim::Mismatch);
    }
    let status: Option<i16> = row.get(2);
    let body: Option<Vec<u8>> = row.get(3);
    match status {
        Some(status) => Ok(Claim::Replay {
            status: status as u16,
            body: body.unwrap_or_default(),
        }),
        None => Err(DbError::Invalid(
            "a committed idempotency key has no answer".to_owned(),
        )),
    }
}

/// Stores the answer of a claimed key; commits with the work.
pub async fn complete(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    key: &str,
    status: u16,
    body: &[u8],
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4
         WHERE user_id = $1 AND key = $2",
        &[&user, &key, &(status as i16), &body],
    )
    .await
    .map_err(DbError::op("store idempotent answer"))?;
    Ok(())
}

/// Gives a claimed key up inside `tx`, for work that failed but must still commit what it did
/// (a retry then starts afresh).
pub async fn release(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    key: &str,
) -> Result<(), DbError> {
    tx.execute(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        &[&user, &key],
    )
    .await
    .map_err(DbError::op("release idempotency key"))?;
    Ok(())
}

/// Deletes records past the TTL; returns how many.
pub async fn prune(client: &impl tokio_postgres::GenericClient) -> Result<u64, DbError> {
    client
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at <= now() - $1::bigint * interval '1 hour'",
            &[&TTL_HOURS],
        )
        .await
        .map_err(DbError::op("prune idempotency keys"))
}
