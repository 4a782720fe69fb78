//! API keys: create (the key is returned once), list (no key material), revoke (refused by every
//! sidecar before the answer).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tollgate_common::api_key;
use uuid::Uuid;

use super::{AppState, Change, Reach, Tx, conn};
use crate::db;
use crate::db::api_keys::ApiKeyRow;
use crate::http::error::AppError;

#[derive(Deserialize)]
pub struct NewKey {
    pub name: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A created key: its row, and the key itself, which is never stored nor shown again.
pub struct Created {
    pub row: ApiKeyRow,
    pub key: String,
}

pub async fn create(state: &AppState, user: Uuid, new: NewKey) -> Result<Created, AppError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AppError::invalid(
            "name must be 1 to 100 characters, without control characters",
        ));
    }
    if new.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(AppError::invalid("expires_at must be in the future"));
    }
    let key = api_key::generate();
    let mut client = conn(state).await?;
    let mut tx = Tx::begin(&mut client, &state.sync).await?;
    let row = db::api_keys::create(
        &tx,
        user,
        name,
        api_key::display_prefix(&key),
        &api_key::hash(&key),
        new.expires_at,
    )
    .await?;
    tx.announce(Change::ApiKey(row.id), Reach::Soon).await?;
    tx.commit().await?;
    Ok(Created { row, key })
}

pub async fn list(state: &AppState, user: Uuid) -> Result<Vec<ApiKeyRow>, AppError> {
    Ok(db::api_keys::list(&**conn(state).await?, user).await?)
}

/// Revokes one of `user`'s keys; "revoked" means refused everywhere when this returns.
pub async fn revoke(state: &AppState, user: Uuid, id: Uuid) -> Result<(), AppError> {
    let mut client = conn(state).await?;
    let mut tx = Tx::begin(&mut client, &state.sync).await?;
    // Another user's key is indistinguishable from a missing one.
    if !db::api_keys::revoke(&tx, user, id).await? {
        return Err(AppError::not_found("no such api key"));
    }
    tx.announce(Change::ApiKey(id), Reach::BeforeAnswer).await?;
    tx.commit().await?;
    Ok(())
}
