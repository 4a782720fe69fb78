//! Calls from the sidecars, on `/internal/`, served only on the internal listener
//! (`internal_listen`, default `127.0.0.1:9002`): the public listener has no such route. Expose
//! that port to the sidecars alone (the NetworkPolicy in `k8s/` does).

use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::AppState;
use super::accounts::path_id;
use super::error::AppError;
use crate::app::accounts;

/// A sidecar found no hash for this user in Redis: write it from PostgreSQL now. Idempotent and
/// harmless — it only rewrites what the user's rows say.
pub async fn sync_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    accounts::sync_user(&state, path_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
