//! Accounts and sessions: register, log in (throttled), rotate and revoke refresh tokens, and the
//! administration of users (list, disable or enable, promote or demote).

use std::net::IpAddr;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{AppState, Change, Reach, Tx, conn};
use crate::auth::throttle::Verdict;
use crate::db;
use crate::db::refresh::Rotation;
use crate::db::users::UserRow;
use crate::domain::{accounts, password, tokens};
use crate::http::error::AppError;

/// How long after a refresh the previous token may be presented again without killing the
/// family (a client that lost the response retries).
pub const REUSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Deserialize)]
pub struct Credentials {
    pub email: String,
    pub password: String,
}

/// A signed-in user: an access token and a refresh token of one login family.
pub struct Session {
    pub user: UserRow,
    pub access_token: String,
    pub refresh_token: String,
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

/// Only this client waits, and for as long as it is told (never for other clients).
fn too_many_attempts(seconds: u64) -> AppError {
    AppError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many failed logins from this client; try again in {seconds} s"),
    )
    .with_details(json!({ "retry_after": seconds }))
    .with_retry_after(seconds)
}

fn session(state: &AppState, user: UserRow, refresh_token: String) -> Result<Session, AppError> {
    let access_token = state
        .tokens
        .issue(user.id, &user.role)
        .map_err(AppError::internal)?;
    Ok(Session {
        user,
        access_token,
        refresh_token,
    })
}

/// Starts a login family for `user` in `tx`.
async fn start_session(state: &AppState, tx: &Tx<'_>, user: UserRow) -> Result<Session, AppError> {
    let (refresh, hash) = tokens::new_refresh();
    db::refresh::start_family(tx, user.id, &hash, state.config.jwt.refresh_ttl.duration()).await?;
    session(state, user, refresh)
}

/// A new account on the free plan, signed in.
pub async fn register(state: &AppState, body: Credentials) -> Result<Session, AppError> {
    let email = accounts::normalize_email(&body.email).map_err(AppError::invalid)?;
    password::check_rules(&body.password).map_err(|e| AppError::invalid(e.to_string()))?;
    let hash = state.hasher.hash(body.password).await?;
    let mut client = conn(state).await?;
    let mut tx = Tx::begin(&mut client, &state.sync).await?;
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
    tx.announce(Change::User(user.id), Reach::Soon).await?;
    let session = start_session(state, &tx, user).await?;
    tx.commit().await?;
    Ok(session)
}

/// Checks a password, throttled per (account, client) and per client (see `auth::throttle`).
pub async fn login(
    state: &AppState,
    body: Credentials,
    client_ip: IpAddr,
) -> Result<Session, AppError> {
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
        db::users::by_email(&**conn(state).await?, &account).await?
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
    let mut client = conn(state).await?;
    if let Some(fresh) = fresh {
        db::users::set_password_hash(&**client, user.id, &fresh).await?;
    }
    let tx = Tx::begin(&mut client, &state.sync).await?;
    let session = start_session(state, &tx, user).await?;
    tx.commit().await?;
    Ok(session)
}

/// Rotates a refresh token. A spent one presented again (outside [`REUSE_GRACE`]) revokes its
/// whole family.
pub async fn refresh(state: &AppState, refresh_token: &str) -> Result<Session, AppError> {
    let presented = tokens::hash(refresh_token);
    let (next, next_hash) = tokens::new_refresh();
    let mut client = conn(state).await?;
    let tx = Tx::begin(&mut client, &state.sync).await?;
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
            let session = session(state, user, next)?;
            tx.commit().await?;
            Ok(session)
        }
        Rotation::Reused => {
            // Keep the revocation: the family is dead.
            tx.commit().await?;
            tracing::warn!("spent refresh token presented again; family revoked");
            Err(invalid_token())
        }
        Rotation::Invalid => Err(invalid_token()),
    }
}

/// Revokes the login family of a refresh token.
pub async fn logout(state: &AppState, refresh_token: &str) -> Result<(), AppError> {
    db::refresh::logout(&**conn(state).await?, &tokens::hash(refresh_token)).await?;
    Ok(())
}

/// A user by id; `None` if there is none.
pub async fn user(state: &AppState, id: Uuid) -> Result<Option<UserRow>, AppError> {
    Ok(db::users::get(&**conn(state).await?, id).await?)
}

/// Users by email substring, after the cursor's `(created_at, id)`, up to `limit`.
pub async fn list_users(
    state: &AppState,
    email: Option<&str>,
    after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<UserRow>, AppError> {
    let email = email.filter(|e| !e.is_empty());
    Ok(db::users::list(&**conn(state).await?, email, after, limit).await?)
}

#[derive(Deserialize)]
pub struct UserPatch {
    pub status: Option<String>,
    pub role: Option<String>,
}

impl UserPatch {
    fn check(&self, admin: Uuid, id: Uuid) -> Result<(), AppError> {
        if let Some(status) = &self.status
            && !matches!(status.as_str(), "active" | "disabled")
        {
            return Err(AppError::invalid("status must be active or disabled"));
        }
        if let Some(role) = &self.role
            && !matches!(role.as_str(), "user" | "admin")
        {
            return Err(AppError::invalid("role must be user or admin"));
        }
        if self.status.is_none() && self.role.is_none() {
            return Err(AppError::invalid(
                "nothing to change: give status and/or role",
            ));
        }
        if id == admin
            && (self.status.as_deref() == Some("disabled") || self.role.as_deref() == Some("user"))
        {
            return Err(AppError::invalid(
                "an admin cannot disable or demote their own account",
            ));
        }
        Ok(())
    }
}

/// An admin disables or enables, promotes or demotes a user; in force at every sidecar before
/// the answer. Disabling revokes the user's refresh tokens.
pub async fn patch_user(
    state: &AppState,
    admin: Uuid,
    id: Uuid,
    patch: &UserPatch,
) -> Result<UserRow, AppError> {
    patch.check(admin, id)?;
    let mut client = conn(state).await?;
    let mut tx = Tx::begin(&mut client, &state.sync).await?;
    let (before, after) =
        db::users::update_admin_fields(&tx, id, patch.status.as_deref(), patch.role.as_deref())
            .await?
            .ok_or_else(|| AppError::not_found("no such user"))?;
    if after.status == "disabled" && before.status != "disabled" {
        db::refresh::revoke_all(&*tx, id, "user_disabled").await?;
    }
    tx.announce(Change::User(id), Reach::BeforeAnswer).await?;
    tx.audit(
        admin,
        "user.update",
        ("user", &id.to_string()),
        &json!({
            "before": {"status": before.status, "role": before.role},
            "after": {"status": after.status, "role": after.role},
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// A sidecar found no hash for this user in Redis: write it from PostgreSQL now.
pub async fn sync_user(state: &AppState, id: Uuid) -> Result<(), AppError> {
    match state.sync.user(id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(AppError::not_found("no such user")),
        Err(e) => Err(AppError::unavailable(e)),
    }
}
