//! `/v1/admin/users`: list and search users; disable / enable, promote / demote. Every change is
//! written to the audit log with the acting admin.

use axum::extract::{Path, State};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::accounts::path_id;
use super::cursor;
use super::dto::{Page, User};
use super::error::AppError;
use super::extract::{Json, Query};
use crate::app::accounts::{self, UserPatch};
use crate::auth::AuthUser;

#[derive(Deserialize)]
pub struct ListQuery {
    email: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

pub async fn list_users(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<User>>, AppError> {
    let limit = cursor::limit(query.limit)?;
    let after = cursor::decode_opt::<Uuid>(query.cursor.as_deref())?;
    let rows = accounts::list_users(&state, query.email.as_deref(), after, limit + 1).await?;
    let page = cursor::page(rows, limit, |u| cursor::encode(u.created_at, u.id));
    Ok(Json(page.map(User::from)))
}

pub async fn patch_user(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    Json(body): Json<UserPatch>,
) -> Result<Json<User>, AppError> {
    let user = accounts::patch_user(&state, auth.id, path_id(&id)?, &body).await?;
    Ok(Json(user.into()))
}
