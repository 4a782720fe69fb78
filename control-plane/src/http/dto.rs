//! Response shapes of the contract.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::api_keys::ApiKeyRow;
use crate::db::users::UserRow;

#[derive(Serialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(u: UserRow) -> User {
        User {
            id: u.id.to_string(),
            email: u.email,
            role: u.role,
            status: u.status,
            created_at: u.created_at,
        }
    }
}

#[derive(Serialize)]
pub struct TokenResponse {
    pub user: User,
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
}

#[derive(Serialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(k: ApiKeyRow) -> ApiKey {
        ApiKey {
            id: k.id.to_string(),
            name: k.name,
            prefix: k.prefix,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// The one-time answer to creating a key: the only time `key` is ever shown.
#[derive(Serialize)]
pub struct NewApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub key: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

#[derive(Serialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}
