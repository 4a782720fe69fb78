//! Refresh tokens: single use, rotated in one row-locked transaction, grouped in families that
//! die whole when a spent token is presented again.

use std::time::Duration;

use uuid::Uuid;

use super::DbError;
use super::users::UserRow;

/// Starts a family (one login) with its first token.
pub async fn start_family(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    token_hash: &[u8; 32],
    ttl: Duration,
) -> Result<(), DbError> {
    let ttl_ms = ttl.as_millis() as i64;
    tx.execute(
        "WITH f AS (INSERT INTO refresh_token_families (user_id) VALUES ($1) RETURNING id)
         INSERT INTO refresh_tokens (family_id, token_hash, expires_at)
         SELECT f.id, $2, now() + $3::bigint * interval '1 millisecond' FROM f",
        &[&user, &token_hash.as_slice(), &ttl_ms],
    )
    .await
    .map_err(DbError::op("start refresh family"))?;
    Ok(())
}

pub enum Rotation {
    /// The presented token was spent and a new one issued for this user.
    Rotated(UserRow),
    /// Unknown, expired, revoked, or the user is disabled.
    Invalid,
    /// A spent token was presented outside the grace period: the family is now revoked.
    Reused,
}

/// Spends the presented token and records `new_hash` as its successor.
///
/// A spent token presented again within `grace` of being spent, whose successor is still
/// unspent, is treated as a retry by a client that lost the response: the successor is spent
/// instead and `new_hash` follows it. Any other reuse revokes the whole family.
pub async fn rotate(
    tx: &tokio_postgres::Transaction<'_>,
    presented: &[u8; 32],
    new_hash: &[u8; 32],
    ttl: Duration,
    grace: Duration,
) -> Result<Rotation, DbError> {
    // The family row lock serialises every change to the family's tokens.
    let Some(row) = tx
        .query_opt(
            "SELECT t.id, t.family_id, t.expires_at > now() AS live,
                    t.spent_at IS NOT NULL AS spent,
                    t.spent_at > now() - $2::bigint * interval '1 millisecond' AS in_grace,
                    f.revoked_at IS NOT NULL AS revoked,
                    u.id AS user_id, u.email, u.role, u.status, u.created_at
             FROM refresh_tokens t
             JOIN refresh_token_families f ON f.id = t.family_id
             JOIN users u ON u.id = f.user_id
             WHERE t.token_hash = $1
             FOR UPDATE OF f",
            &[&presented.as_slice(), &(grace.as_millis() as i64)],
        )
        .await
        .map_err(DbError::op("find refresh token"))?
    else {
        return Ok(Rotation::Invalid);
    };
    let user = UserRow {
        id: row.get("user_id"),
        email: row.get("email"),
        role: row.get("role"),
        status: row.get("status"),
        created_at: row.get("created_at"),
    };
    let token_id: Uuid = row.get("id");
    let family_id: Uuid = row.get("family_id");
    if row.get::<_, bool>("revoked") || user.status != "active" || !row.get::<_, bool>("live") {
        return Ok(Rotation::Invalid);
    }
    let mut parent = token_id;
    if row.get::<_, bool>("spent") {
        let successor = if row.get::<_, Option<bool>>("in_grace") == Some(true) {
            tx.query_opt(
                "SELECT id FROM refresh_tokens WHERE parent_id = $1 AND spent_at IS NULL",
                &[&token_id],
            )
            .await
            .map_err(DbError::op("find successor token"))?
            .map(|r| r.get::<_, Uuid>(0))
        } else {
            None
        };
        match successor {
            Some(successor) => parent = successor,
            None => {
                revoke_family(tx, family_id, "reuse").await?;
                return Ok(Rotation::Reused);
            }
        }
    }
    tx.execute(
        "UPDATE refresh_tokens SET spent_at = now() WHERE id = $1",
        &[&parent],
    )
    .await
    .map_err(DbError::op("spend refresh token"))?;
    tx.execute(
        "INSERT INTO refresh_tokens (family_id, token_hash, parent_id, expires_at)
         VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond')",
        &[
            &family_id,
            &new_hash.as_slice(),
            &parent,
            &(ttl.as_millis() as i64),
        ],
    )
    .await
    .map_err(DbError::op("insert refresh token"))?;
    Ok(Rotation::Rotated(user))
}

async fn revoke_family(
    tx: &tokio_postgres::Transaction<'_>,
    family: Uuid,
    reason: &str,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = $2
         WHERE id = $1 AND revoked_at IS NULL",
        &[&family, &reason],
    )
    .await
    .map_err(DbError::op("revoke refresh family"))?;
    Ok(())
}

/// Logout: revokes the family of the presented token, if it is one.
pub async fn logout(
    client: &impl tokio_postgres::GenericClient,
    presented: &[u8; 32],
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = 'logout'
             WHERE revoked_at IS NULL
               AND id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
            &[&presented.as_slice()],
        )
        .await
        .map_err(DbError::op("logout"))?;
    Ok(())
}

/// Revokes every live family of a user (the user was disabled).
pub async fn revoke_all(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    reason: &str,
) -> Result<u64, DbError> {
    client
        .execute(
            "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = $2
             WHERE user_id = $1 AND revoked_at IS NULL",
            &[&user, &reason],
        )
        .await
        .map_err(DbError::op("revoke user's refresh families"))
}
