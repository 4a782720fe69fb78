//! Accounts and tokens: register, login, refresh, logout, `/v1/me` and the JWKS.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::dto::{TokenResponse, User};
use super::error::AppError;
use super::extract::Json;
use crate::app::accounts::{self, Credentials, Session};
use crate::auth::{AuthUser, Peer, client_ip};

#[derive(Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

fn token_response(state: &AppState, session: Session) -> Json<TokenResponse> {
    Json(TokenResponse {
        user: session.user.into(),
        access_token: session.access_token,
        refresh_token: session.refresh_token,
        token_type: "Bearer",
        expires_in: state.tokens.ttl_seconds(),
    })
}

pub async fn register(
    State(state): State<AppState>,
    Json(body): Json<Credentials>,
) -> Result<Response, AppError> {
    let session = accounts::register(&state, body).await?;
    Ok((StatusCode::CREATED, token_response(&state, session)).into_response())
}

pub async fn login(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<Credentials>,
) -> Result<Json<TokenResponse>, AppError> {
    let client_ip = client_ip(&headers, peer, state.config.trust_forwarded_for);
    let session = accounts::login(&state, body, client_ip).await?;
    Ok(token_response(&state, session))
}

pub async fn refresh(
    State(state): State<AppState>,
    Json(body): Json<RefreshBody>,
) -> Result<Json<TokenResponse>, AppError> {
    let session = accounts::refresh(&state, &body.refresh_token).await?;
    Ok(token_response(&state, session))
}

pub async fn logout(
    State(state): State<AppState>,
    Json(body): Json<RefreshBody>,
) -> Result<StatusCode, AppError> {
    accounts::logout(&state, &body.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(State(state): State<AppState>, auth: AuthUser) -> Result<Json<User>, AppError> {
    let user = accounts::user(&state, auth.id)
        .await?
        .ok_or_else(AppError::unauthorized)?;
    Ok(Json(user.into()))
}

pub async fn jwks(State(state): State<AppState>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(state.tokens.ring().jwks()),
    )
        .into_response()
}

/// Parses an id from a path; anything that is not a UUID cannot name an object, so `404`.
pub fn path_id(raw: &str) -> Result<Uuid, AppError> {
    raw.parse()
        .map_err(|_| AppError::not_found("no such object"))
}
