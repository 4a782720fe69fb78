//! Users and their subscriptions' starting point.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

impl UserRow {
    fn from_row(row: &tokio_postgres::Row) -> UserRow {
        UserRow {
            id: row.get("id"),
            email: row.get("email"),
            role: row.get("role"),
            status: row.get("status"),
            created_at: row.get("created_at"),
        }
    }
}

/// The unique index on the normalised email (`domain::accounts::email_key`).
pub const EMAIL_UNIQUE: &str = "users_email_key_key";
/// The older unique index on `lower(email)`, kept: a violation of it is a taken email too.
pub const EMAIL_LOWER_UNIQUE: &str = "users_email_lower_key";

/// Whether a unique violation says the email is taken.
pub fn email_taken(constraint: Option<&str>) -> bool {
    matches!(constraint, Some(EMAIL_UNIQUE | EMAIL_LOWER_UNIQUE))
}

/// Creates a user on the `free` plan, in one transaction. `email_key` is
/// `domain::accounts::email_key(email)`. A taken email surfaces as a unique violation that
/// [`email_taken`] recognises.
pub async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    email: &str,
    email_key: &str,
    password_hash: &str,
    role: &str,
) -> Result<UserRow, DbError> {
    let row = tx
        .query_one(
            "INSERT INTO users (email, email_key, password_hash, role) VALUES ($1, $2, $3, $4)
             RETURNING id, email, role, status, created_at",
            &[&email, &email_key, &password_hash, &role],
        )
        .await
        .map_err(DbError::op("insert user"))?;
    let user = UserRow::from_row(&row);
    let subscribed = tx
        .execute(
            "INSERT INTO subscriptions (user_id, plan_id) SELECT $1, id FROM plans WHERE id = 'free'",
            &[&user.id],
        )
        .await
        .map_err(DbError::op("insert free subscription"))?;
    if subscribed != 1 {
        return Err(DbError::Invalid(
            "the `free` plan does not exist: run `tollgate-control-plane seed` first".to_owned(),
        ));
    }
    Ok(user)
}

const USER_COLUMNS: &str = "id, email, role, status, created_at";

/// A user with what login needs.
pub struct Credentials {
    pub user: UserRow,
    pub password_hash: String,
}

/// The user whose normalised email is `email_key` (`domain::accounts::email_key`).
pub async fn by_email(
    client: &impl tokio_postgres::GenericClient,
    email_key: &str,
) -> Result<Option<Credentials>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {USER_COLUMNS}, password_hash FROM users WHERE email_key = $1"),
            &[&email_key],
        )
        .await
        .map_err(DbError::op("find user by email"))?;
    Ok(row.map(|r| Credentials {
        user: UserRow::from_row(&r),
        password_hash: r.get("password_hash"),
    }))
}

/// A user with what authenticating a request needs.
pub struct AuthRow {
    pub user: UserRow,
    /// Tokens issued at or before this second are refused.
    pub tokens_valid_after: Option<i64>,
}

pub async fn for_auth(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
) -> Result<Option<AuthRow>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {USER_COLUMNS}, extract(epoch FROM tokens_valid_after)::bigint AS tva
                 FROM users WHERE id = $1"
            ),
            &[&id],
        )
        .await
        .map_err(DbError::op("find user"))?;
    Ok(row.map(|r| AuthRow {
        user: UserRow::from_row(&r),
        tokens_valid_after: r.get("tva"),
    }))
}

pub async fn get(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
) -> Result<Option<UserRow>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(DbError::op("get user"))?;
    Ok(row.as_ref().map(UserRow::from_row))
}

pub async fn set_password_hash(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
    hash: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
            &[&id, &hash],
        )
        .await
        .map_err(DbError::op("update password hash"))?;
    Ok(())
}

/// Changes status and/or role under a row lock; returns the user before and after, or `None`
/// if there is no such user. Disabling also cuts off every access token issued so far.
pub async fn update_admin_fields(
    tx: &tokio_postgres::Transaction<'_>,
    id: Uuid,
    status: Option<&str>,
    role: Option<&str>,
) -> Result<Option<(UserRow, UserRow)>, DbError> {
    let Some(before) = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE"),
            &[&id],
        )
        .await
        .map_err(DbError::op("lock user"))?
    else {
        return Ok(None);
    };
    let before = UserRow::from_row(&before);
    let after = tx
        .query_one(
            &format!(
                "UPDATE users SET
                     status = COALESCE($2, status),
                     role = COALESCE($3, role),
                     tokens_valid_after = CASE WHEN $2 = 'disabled' AND status <> 'disabled'
                                               THEN now() ELSE tokens_valid_after END,
                     updated_at = now()
                 WHERE id = $1
                 RETURNING {USER_COLUMNS}"
            ),
            &[&id, &status, &role],
        )
        .await
        .map_err(DbError::op("update user"))?;
    Ok(Some((before, UserRow::from_row(&after))))
}

/// One page of users, oldest first, optionally filtered by a case-insensitive email substring.
pub async fn list(
    client: &impl tokio_postgres::GenericClient,
    email_contains: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<UserRow>, DbError> {
    let pattern = email_contains.map(|e| {
        format!(
            "%{}%",
            e.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let (after_time, after_id) = after.unzip();
    let rows = client
        .query(
            &format!(
                "SELECT {USER_COLUMNS} FROM users
                 WHERE ($1::text IS NULL OR email ILIKE $1)
                   AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                 ORDER BY created_at, id
                 LIMIT $4"
            ),
            &[&pattern, &after_time, &after_id, &limit],
        )
        .await
        .map_err(DbError::op("list users"))?;
    Ok(rows.iter().map(UserRow::from_row).collect())
}

/// Every user id, status, role and token cut-off, a batch at a time in id order (reconcile).
pub async fn sync_batch(
    client: &impl tokio_postgres::GenericClient,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<(Uuid, String, String, i64)>, DbError> {
    let rows = client
        .query(
            "SELECT id, status, role, COALESCE(extract(epoch FROM tokens_valid_after)::bigint, 0)
             FROM users WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2",
            &[&after, &limit],
        )
        .await
        .map_err(DbError::op("read users for sync"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}
