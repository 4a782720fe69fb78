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

/// The name of the unique index that makes emails unique case-insensitively.
pub const EMAIL_UNIQUE: &str = "users_email_lower_key";

/// Creates a user on the `free` plan, in one transaction. A taken email surfaces as a unique
/// violation of [`EMAIL_UNIQUE`].
pub async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    email: &str,
    password_hash: &str,
    role: &str,
) -> Result<UserRow, DbError> {
    let row = tx
        .query_one(
            "INSERT INTO users (email, password_hash, role) VALUES ($1, $2, $3)
             RETURNING id, email, role, status, created_at",
            &[&email, &password_hash, &role],
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
