//! Who is calling: access tokens, API keys, password hashing off the async threads, and login
//! throttling. [`authenticate`] is called for every route the route table marks `User` or
//! `Admin` (`http::access`); `AuthUser` is the extractor its handlers take.

pub mod jwt;
pub mod signing;
pub mod throttle;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use tokio::sync::Semaphore;
use tollgate_common::api_key;
use uuid::Uuid;

use crate::db;
use crate::domain::password::{self, PasswordError};
use crate::http::AppState;
use crate::http::error::AppError;

/// Runs argon2 on the blocking pool, at most `concurrency` at once, so that a burst of logins
/// cannot take every core or exhaust memory (19 MiB each); at most `queue` more wait for a
/// slot, and past that a caller gets `503 busy` with `Retry-After` at once. Memory for hashing is
/// therefore bounded by `concurrency` x 19 MiB whatever the burst.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// Hashing slots plus waiting places.
    admission: Arc<Semaphore>,
    /// A hash of nothing in particular, verified for unknown and disabled accounts so that
    /// their answer takes as long as a real one.
    dummy: Arc<str>,
}

impl Hasher {
    pub fn new(concurrency: usize, queue: usize) -> Result<Hasher, PasswordError> {
        Ok(Hasher {
            permits: Arc::new(Semaphore::new(concurrency)),
            admission: Arc::new(Semaphore::new(concurrency + queue)),
            dummy: password::hash("tollgate timing equaliser")?.into(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AppError> {
        let Ok(_admitted) = self.admission.try_acquire() else {
            return Err(AppError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many password checks in progress; try again in a second",
            )
            .with_retry_after(1));
        };
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| AppError::internal(format!("hasher closed: {e}")))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AppError::internal(format!("hashing task: {e}")))
    }

    pub async fn hash(&self, secret: String) -> Result<String, AppError> {
        self.blocking(move || password::hash(&secret))
            .await?
            .map_err(AppError::internal)
    }

    /// Verifies `secret` against `phc`, or against the dummy hash when there is no account.
    pub async fn verify(&self, secret: String, phc: Option<String>) -> Result<bool, AppError> {
        let found = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy.to_string());
        let ok = self
            .blocking(move || password::verify(&secret, &phc))
            .await?;
        Ok(found && ok)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

/// An authenticated, active user.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    pub role: String,
    pub method: AuthMethod,
}

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The caller the route's access layer authenticated. A handler of a route the table marks
/// `Public` or `Gateway` has none: asking is a bug in the table, answered as an internal error.
impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        parts.extensions.get::<AuthUser>().cloned().ok_or_else(|| {
            AppError::internal(
                "a handler asked for the caller on a route its access does not authenticate",
            )
        })
    }
}

/// Who is calling: an API key (`X-API-Key`) or a bearer access token of an active user whose
/// tokens were not cut off since. `401` otherwise.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<AuthUser, AppError> {
    if let Some(key) = parts.headers.get("x-api-key") {
        let key = key.to_str().map_err(|_| AppError::unauthorized())?;
        return by_api_key(state, key).await;
    }
    let token = bearer(parts).ok_or_else(AppError::unauthorized)?;
    let claims = state.tokens.verify(token).map_err(|e| {
        let mut err = AppError::unauthorized();
        err.internal = Some(e.to_string());
        err
    })?;
    let id: Uuid = claims.sub.parse().map_err(|_| AppError::unauthorized())?;
    let client = state.db.get().await.map_err(db::DbError::from)?;
    let row = db::users::for_auth(&**client, id)
        .await?
        .ok_or_else(AppError::unauthorized)?;
    if row.user.status != "active" || row.tokens_valid_after.is_some_and(|tva| claims.iat <= tva) {
        return Err(AppError::unauthorized());
    }
    // The role is read from the database, not the token, so a demotion takes effect at once.
    Ok(AuthUser {
        id,
        role: row.user.role,
        method: AuthMethod::Jwt,
    })
}

async fn by_api_key(state: &AppState, key: &str) -> Result<AuthUser, AppError> {
    if !api_key::is_well_formed(key) {
        return Err(AppError::unauthorized());
    }
    let client = state.db.get().await.map_err(db::DbError::from)?;
    let (key_id, user_id) = db::api_keys::owner(&**client, &api_key::hash(key))
        .await?
        .ok_or_else(AppError::unauthorized)?;
    let user = db::users::get(&**client, user_id)
        .await?
        .filter(|u| u.status == "active")
        .ok_or_else(AppError::unauthorized)?;
    let sync = state.sync.clone();
    tokio::spawn(async move {
        if let Err(e) = sync.note_key_use(key_id).await {
            tracing::debug!(error = %e, "could not note api key use");
        }
    });
    Ok(AuthUser {
        id: user.id,
        role: user.role,
        method: AuthMethod::ApiKey,
    })
}

/// The caller's address, for login throttling: the peer, or the last `X-Forwarded-For` hop when
/// configured to trust it.
pub fn client_ip(
    parts_headers: &axum::http::HeaderMap,
    peer: Option<SocketAddr>,
    trust_xff: bool,
) -> IpAddr {
    if trust_xff
        && let Some(ip) = parts_headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip())
}

/// Extracts the peer address when the server was started with connect info.
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}
