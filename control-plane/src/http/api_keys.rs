//! `/v1/api-keys`: create (the key is shown once), list (no key material), revoke.

use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::AppState;
use super::accounts::path_id;
use super::dto::{ApiKey, Items, NewApiKey};
use super::error::AppError;
use super::extract::Json;
use crate::app::keys::{self, NewKey};
use crate::auth::AuthUser;

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<NewKey>,
) -> Result<(StatusCode, Json<NewApiKey>), AppError> {
    let keys::Created { row, key } = keys::create(&state, auth.id, body).await?;
    let created = NewApiKey {
        id: row.id.to_string(),
        name: row.name,
        prefix: row.prefix,
        key,
        created_at: row.created_at,
        expires_at: row.expires_at,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
) -> Result<Json<Items<ApiKey>>, AppError> {
    let items = keys::list(&state, auth.id).await?;
    Ok(Json(Items {
        items: items.into_iter().map(ApiKey::from).collect(),
    }))
}

pub async fn revoke(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    keys::revoke(&state, auth.id, path_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
