//! The REST layer: router, request-scoped plumbing (request ids, metrics, one log line per
//! request) and the handlers, which call `db/` and `domain/`.

mod accounts;
mod admin;
mod api_keys;
pub mod cursor;
pub mod dto;
pub mod error;
pub mod extract;
mod internal;
mod metering;
mod ops;
mod payments;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use deadpool_postgres::Pool;
use tollgate_common::request_id;

use crate::auth::Hasher;
use crate::auth::jwt::Tokens;
use crate::auth::throttle::Throttle;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::redis::RedisClient;
use crate::sync::Syncer;
use error::AppError;

/// Everything a handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Pool,
    pub redis: RedisClient,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    pub hasher: Hasher,
    pub throttle: Throttle,
    pub sync: Syncer,
    pub payments: crate::payments::service::Payments,
}

/// The request id of the current request, for handlers and logs.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The route template that served a request, passed from the inner layer to the outer one.
#[derive(Clone)]
struct RouteLabel(String);

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit;
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/.well-known/jwks.json", get(accounts::jwks))
        .route("/v1/auth/register", post(accounts::register))
        .route("/v1/auth/login", post(accounts::login))
        .route("/v1/auth/refresh", post(accounts::refresh))
        .route("/v1/auth/logout", post(accounts::logout))
        .route("/v1/me", get(accounts::me))
        .route("/v1/api-keys", post(api_keys::create).get(api_keys::list))
        .route("/v1/api-keys/{id}", delete(api_keys::revoke))
        .route("/v1/admin/users", get(admin::list_users))
        .route("/v1/admin/users/{id}", patch(admin::patch_user))
        .route("/v1/plans", get(metering::plans))
        .route("/v1/quota", get(metering::quota))
        .route("/v1/usage", get(metering::usage))
        .route(
            "/v1/admin/users/{id}/quota",
            get(metering::admin_user_quota),
        )
        .route("/v1/admin/users/{id}/grants", post(metering::grant))
        .route("/v1/admin/users/{id}/reset", post(metering::reset))
        .route("/v1/admin/apps", post(metering::create_app))
        .route(
            "/v1/admin/apps/{app}/quota-types",
            post(metering::create_quota_type),
        )
        .route("/v1/admin/plans/{id}", put(metering::put_plan))
        .route("/v1/orders", post(payments::create))
        .route("/v1/orders/{id}", get(payments::get))
        .route("/v1/orders/{id}/qr.svg", get(payments::qr_svg))
        .route("/v1/orders/{id}/qr.png", get(payments::qr_png))
        .route("/v1/payments/alipay/notify", post(payments::alipay_notify))
        .route("/v1/payments/wechat/notify", post(payments::wechat_notify))
        .route("/v1/admin/orders/{id}/refund", post(payments::admin_refund))
        .route("/checkout", get(payments::checkout))
        .route("/internal/users/{id}/sync", post(internal::sync_user))
        // Inside routing, so the matched route template is known.
        .route_layer(middleware::from_fn(label_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Outermost: every response, including 404s and rejections, gets a request id, a
        // metric and a log line.
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> AppError {
    AppError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn label_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteLabel(route));
    }
    response
}

async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id::choose(
        request
            .headers()
            .get(request_id::HEADER)
            .map(|v| v.as_bytes()),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let method = request.method().clone();

    let mut response = next.run(request).await.into_response();

    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or("unmatched", |r| r.0.as_str())
        .to_owned();
    let status = response.status();
    let elapsed = started.elapsed();
    state
        .metrics
        .http_requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        request_id = %id,
        method = %method,
        route = %route,
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}
