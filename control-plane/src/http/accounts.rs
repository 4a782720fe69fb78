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
use crate::auth::throttle::Verdict;
use crate::auth::{AuthUser, Peer, client_ip};
use crate::db::outbox::Topic;
use crate::db::refresh::Rotation;
use crate::db::users::UserRow;
use crate::db::{self, DbError};
use crate::domain::{accounts, password, tokens};

#[derive(Deserialize)]
pub struct CredentialsBody {
    email: String,
    password: String,
}

#[derive(Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

fn invalid_credentials() -> AppError {
    AppError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "the email or password is wrong",
    )
}

fn invalid_token() -> AppError {
    AppError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_token",
        "the refresh token is invalid, expired or already used",
    )
}

/// Starts a login family for `user` and answers with a fresh token pair.
async fn issue_session(
    state: &AppState,
    tx: &tokio_postgres::Transaction<'_>,
    user: UserRow,
) -> Result<TokenResponse, AppError> {
    let (refresh, hash) = tokens::new_refresh();
    db::refresh::start_family(tx, user.id, &hash, state.config.jwt.refresh_ttl.duration()).await?;
    token_response(state, user, refresh)
}

fn token_response(
    state: &AppState,
    user: UserRow,
    refresh_token: String,
) -> Result<TokenResponse, AppError> {
    let access_token = state
        .tokens
        .issue(user.id, &user.role)
        .map_err(AppError::internal)?;
    Ok(TokenResponse {
        user: user.into(),
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.tokens.ttl_seconds(),
    })
}

pub async fn register(
    State(state): State<AppState>,
    Json(body): Json<CredentialsBody>,
) -> Result<Response, AppError> {
    let email = accounts::normalize_email(&body.email).map_err(AppError::invalid)?;
    password::check_rules(&body.password).map_err(|e| AppError::invalid(e.to_string()))?;
    let hash = state.hasher.hash(body.password).await?;
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin register"))?;
    let key = accounts::email_key(&email);
    let user = db::users::create(&tx, &email, &key, &hash, "user")
        .await
        .map_err(|e| {
            const TAKEN: &str = "an account with this email already exists";
            AppError::from_db(
                e,
                &[
                    (db::users::EMAIL_UNIQUE, "email_taken", TAKEN),
                    (db::users::EMAIL_LOWER_UNIQUE, "email_taken", TAKEN),
                ],
            )
        })?;
    db::outbox::enqueue(&*tx, Topic::User, &user.id.to_string()).await?;
    let response = issue_session(&state, &tx, user).await?;
    tx.commit().await.map_err(DbError::op("commit register"))?;
    state.sync.kick();
    Ok((StatusCode::CREATED, Json(response)).into_response())
}

pub async fn login(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<CredentialsBody>,
) -> Result<Response, AppError> {
    let client_ip = client_ip(&headers, peer, state.config.trust_forwarded_for);
    // Throttled per (account, client) and per client: see auth::throttle.
    let account = accounts::email_key(&body.email);
    if let Verdict::Locked(seconds) = state
        .throttle
        .check(&state.redis, &account, client_ip)
        .await
        .map_err(AppError::unavailable)?
    {
        return Err(too_many_attempts(seconds));
    }
    // No pooled connection is held while the password is hashed (that may wait in the queue).
    let found = if accounts::normalize_email(&body.email).is_ok() {
        let client = state.db.get().await.map_err(DbError::from)?;
        db::users::by_email(&**client, &account).await?
    } else {
        None
    };
    // Unknown, disabled and over-long all verify against the dummy hash: same answer, same time.
    let (user, phc) = match found {
        Some(c) if c.user.status == "active" => (Some(c.user), Some(c.password_hash)),
        _ => (None, None),
    };
    let candidate =
        if password::check_rules(&body.password) == Err(password::PasswordError::TooLong) {
            String::new()
        } else {
            body.password
        };
    let ok = state.hasher.verify(candidate.clone(), phc.clone()).await?;
    let Some(user) = user.filter(|_| ok) else {
        state
            .throttle
            .fail(&state.redis, &account, client_ip)
            .await
            .map_err(AppError::unavailable)?;
        return Err(invalid_credentials());
    };
    if let Err(e) = state
        .throttle
        .succeed(&state.redis, &account, client_ip)
        .await
    {
        tracing::warn!(error = %e, "could not clear login failures");
    }
    let fresh = if phc.as_deref().is_some_and(password::needs_rehash) {
        Some(state.hasher.hash(candidate).await?)
    } else {
        None
    };
    let mut client = state.db.get().await.map_err(DbError::from)?;
    if let Some(fresh) = fresh {
        db::users::set_password_hash(&**client, user.id, &fresh).await?;
    }
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin login"))?;
    let response = issue_session(&state, &tx, user).await?;
    tx.commit().await.map_err(DbError::op("commit login"))?;
    Ok(Json(response).into_response())
}

/// Only this client waits, and for as long as it is told (never for other clients).
fn too_many_attempts(seconds: u64) -> AppError {
    AppError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many failed logins from this client; try again in {seconds} s"),
    )
    .with_details(serde_json::json!({ "retry_after": seconds }))
    .with_retry_after(seconds)
}

pub async fn refresh(
    State(state): State<AppState>,
    Json(body): Json<RefreshBody>,
) -> Result<Response, AppError> {
    let presented = tokens::hash(&body.refresh_token);
    let (next, next_hash) = tokens::new_refresh();
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin refresh"))?;
    let rotation = db::refresh::rotate(
        &tx,
        &presented,
        &next_hash,
        state.config.jwt.refresh_ttl.duration(),
        REUSE_GRACE,
    )
    .await?;
    match rotation {
        Rotation::Rotated(user) => {
            let response = token_response(&state, user, next)?;
            tx.commit().await.map_err(DbError::op("commit refresh"))?;
            Ok(Json(response).into_response())
        }
        Rotation::Reused => {
            // Keep the revocation: the family is dead.
            tx.commit()
                .await
                .map_err(DbError::op("commit revocation"))?;
            tracing::warn!("spent refresh token presented again; family revoked");
            Err(invalid_token())
        }
        Rotation::Invalid => Err(invalid_token()),
    }
}

/// How long after a refresh the previous token may be presented again without killing the
/// family (a client that lost the response retries).
pub const REUSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn logout(
    State(state): State<AppState>,
    Json(body): Json<RefreshBody>,
) -> Result<StatusCode, AppError> {
    let client = state.db.get().await.map_err(DbError::from)?;
    db::refresh::logout(&**client, &tokens::hash(&body.refresh_token)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(State(state): State<AppState>, auth: AuthUser) -> Result<Json<User>, AppError> {
    let client = state.db.get().await.map_err(DbError::from)?;
    let user = db::users::get(&**client, auth.id)
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
