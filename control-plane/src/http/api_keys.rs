//! `/v1/api-keys`: create (the key is shown once), list (no key material), revoke.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tollgate_common::api_key;

use super::AppState;
use super::accounts::path_id;
use super::dto::{ApiKey, Items, NewApiKey};
use super::error::AppError;
use super::extract::Json;
use crate::auth::AuthUser;
use crate::db::outbox::Topic;
use crate::db::{self, DbError};

#[derive(Deserialize)]
pub struct CreateBody {
    name: String,
    expires_at: Option<DateTime<Utc>>,
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<CreateBody>,
) -> Result<Response, AppError> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AppError::invalid(
            "name must be 1 to 100 characters, without control characters",
        ));
    }
    if body.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(AppError::invalid("expires_at must be in the future"));
    }
    let key = api_key::generate();
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin create key"))?;
    let row = db::api_keys::create(
        &tx,
        auth.id,
        name,
        api_key::display_prefix(&key),
        &api_key::hash(&key),
        body.expires_at,
    )
    .await?;
    db::outbox::enqueue(&*tx, Topic::ApiKey, &row.id.to_string()).await?;
    tx.commit()
        .await
        .map_err(DbError::op("commit create key"))?;
    state.sync.kick();
    let created = NewApiKey {
        id: row.id.to_string(),
        name: row.name,
        prefix: row.prefix,
        key,
        created_at: row.created_at,
        expires_at: row.expires_at,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
) -> Result<Json<Items<ApiKey>>, AppError> {
    let client = state.db.get().await.map_err(DbError::from)?;
    let items = db::api_keys::list(&**client, auth.id).await?;
    Ok(Json(Items {
        items: items.into_iter().map(ApiKey::from).collect(),
    }))
}

pub async fn revoke(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let id = path_id(&id)?;
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin revoke key"))?;
    // Another user's key is indistinguishable from a missing one.
    if !db::api_keys::revoke(&tx, auth.id, id).await? {
        return Err(AppError::not_found("no such api key"));
    }
    db::outbox::enqueue(&*tx, Topic::ApiKey, &id.to_string()).await?;
    tx.commit()
        .await
        .map_err(DbError::op("commit revoke key"))?;
    // Remove it from Redis before answering, so that "deleted" means "refused everywhere";
    // should Redis fail now, the outbox row finishes the job.
    if let Err(e) = state.sync.api_key(id).await {
        tracing::warn!(error = %e, "revocation not yet in redis; the outbox will retry");
    }
    state.sync.kick();
    Ok(StatusCode::NO_CONTENT)
}
