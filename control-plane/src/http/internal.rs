//! Calls from the sidecars, on `/internal/`, served only on the internal listener
//! (`internal_listen`, default `127.0.0.1:9002`): the public listener has no such route. Expose
//! that port to the sidecars alone (the NetworkPolicy in `k8s/` does).

use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::AppState;
use super::accounts::path_id;
use super::error::AppError;

/// A sidecar found no hash for this user in Redis: write it from PostgreSQL now. Idempotent and
/// harmless — it only rewrites what the user's rows say.
pub async fn sync_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let id = path_id(&id)?;
    match state.sync.user(id).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(AppError::not_found("no such user")),
        Err(e) => Err(AppError::unavailable(e)),
    }
}
