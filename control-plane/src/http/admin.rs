//! `/v1/admin/users`: list and search users; disable / enable, promote / demote. Every change is
//! written to the audit log with the acting admin.

use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::accounts::path_id;
use super::cursor;
use super::dto::{Page, User};
use super::error::AppError;
use super::extract::{Json, Query};
use crate::auth::AuthUser;
use crate::db::outbox::Topic;
use crate::db::{self, DbError};

#[derive(Deserialize)]
pub struct ListQuery {
    email: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

pub async fn list_users(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<User>>, AppError> {
    auth.require_admin()?;
    let limit = cursor::limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(cursor::decode::<Uuid>)
        .transpose()?;
    let client = state.db.get().await.map_err(DbError::from)?;
    let mut rows = db::users::list(
        &**client,
        query.email.as_deref().filter(|e| !e.is_empty()),
        after,
        limit + 1,
    )
    .await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|u| cursor::encode(u.created_at, u.id))
    } else {
        None
    };
    Ok(Json(Page {
        items: rows.into_iter().map(User::from).collect(),
        next_cursor,
    }))
}

#[derive(Deserialize)]
pub struct PatchBody {
    status: Option<String>,
    role: Option<String>,
}

pub async fn patch_user(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    Json(body): Json<PatchBody>,
) -> Result<Json<User>, AppError> {
    auth.require_admin()?;
    let id = path_id(&id)?;
    if let Some(status) = &body.status
        && !matches!(status.as_str(), "active" | "disabled")
    {
        return Err(AppError::invalid("status must be active or disabled"));
    }
    if let Some(role) = &body.role
        && !matches!(role.as_str(), "user" | "admin")
    {
        return Err(AppError::invalid("role must be user or admin"));
    }
    if body.status.is_none() && body.role.is_none() {
        return Err(AppError::invalid(
            "nothing to change: give status and/or role",
        ));
    }
    if id == auth.id
        && (body.status.as_deref() == Some("disabled") || body.role.as_deref() == Some("user"))
    {
        return Err(AppError::invalid(
            "an admin cannot disable or demote their own account",
        ));
    }
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin user update"))?;
    let (before, after) =
        db::users::update_admin_fields(&tx, id, body.status.as_deref(), body.role.as_deref())
            .await?
            .ok_or_else(|| AppError::not_found("no such user"))?;
    if after.status == "disabled" && before.status != "disabled" {
        db::refresh::revoke_all(&*tx, id, "user_disabled").await?;
    }
    db::outbox::enqueue(&*tx, Topic::User, &id.to_string()).await?;
    db::audit::record(
        &*tx,
        auth.id,
        "user.update",
        "user",
        &id.to_string(),
        &json!({
            "before": {"status": before.status, "role": before.role},
            "after": {"status": after.status, "role": after.role},
        }),
    )
    .await?;
    tx.commit()
        .await
        .map_err(DbError::op("commit user update"))?;
    // Reach the sidecars before answering; the outbox retries if Redis fails now.
    if let Err(e) = state.sync.user(id).await {
        tracing::warn!(error = %e, "user change not yet in redis; the outbox will retry");
    }
    state.sync.kick();
    Ok(Json(after.into()))
}
