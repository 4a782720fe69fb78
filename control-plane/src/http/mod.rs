//! The REST layer: router, access from the route table, request-scoped plumbing (request ids,
//! metrics, one log line per request) and the handlers, which parse, call a use case of `app/`
//! and answer.

mod access;
mod accounts;
mod admin;
mod api_keys;
pub mod cursor;
pub mod dto;
pub mod error;
pub mod extract;
pub mod hygiene;
pub mod idempotency;
mod internal;
mod metering;
pub mod openapi;
mod ops;
mod pages;
mod payments;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tollgate_common::request_id;
use tracing::Instrument;

pub use crate::app::AppState;
use error::AppError;

/// The request id of the current request, for handlers and logs.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The route template that served a request, passed from the inner layer to the outer one.
#[derive(Clone)]
struct RouteLabel(String);

/// Registers every route, guarded by its access (`access::guard`), and, from the same table,
/// describes it for the OpenAPI document.
macro_rules! api_routes {
    ($router:expr, $state:expr; $( $method:ident $path:literal => $handler:path, $access:ident, $ok:literal $okdesc:literal, $summary:literal $(, query: [$($q:literal),*])? $(, body: $body:literal)? $(, idempotent: $idempotent:literal)? ; )*) => {{
        let mut router = $router;
        let mut ops = Vec::new();
        $(
            router = router.route(
                $path,
                access::guard(axum::routing::$method($handler), openapi::Access::$access, $state),
            );
            ops.push(openapi::Op {
                method: stringify!($method),
                path: $path,
                summary: $summary,
                access: openapi::Access::$access,
                ok: ($ok, $okdesc),
                query: &[$($($q),*)?],
                body: concat!("" $(, $body)?),
                idempotent: false $(|| $idempotent)?,
            });
        )*
        (router, ops)
    }};
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit;
    let (router, ops) = api_routes! { Router::new(), &state;
        get "/healthz" => ops::healthz, Public, 200 "alive", "Liveness";
        get "/readyz" => ops::readyz, Public, 200 "PostgreSQL and Redis reachable", "Readiness";
        get "/metrics" => ops::metrics, Public, 200 "Prometheus text format", "Metrics";
        get "/.well-known/jwks.json" => accounts::jwks, Public, 200 "JWK Set", "Keys that sign access tokens";
        post "/v1/auth/register" => accounts::register, Public, 201 "Token response", "Create an account on the free plan", body: "{email, password}";
        post "/v1/auth/login" => accounts::login, Public, 200 "Token response", "Log in", body: "{email, password}";
        post "/v1/auth/refresh" => accounts::refresh, Public, 200 "Token response with a new refresh token", "Rotate a refresh token", body: "{refresh_token}";
        post "/v1/auth/logout" => accounts::logout, Public, 204 "Logged out", "Revoke a login's refresh tokens", body: "{refresh_token}";
        get "/v1/me" => accounts::me, User, 200 "User", "The caller";
        post "/v1/api-keys" => api_keys::create, User, 201 "The key, shown once", "Create an API key", body: "{name, expires_at?}";
        get "/v1/api-keys" => api_keys::list, User, 200 "{items}", "List API keys (no key material)";
        delete "/v1/api-keys/{id}" => api_keys::revoke, User, 204 "Revoked everywhere", "Revoke an API key";
        get "/v1/admin/users" => admin::list_users, Admin, 200 "{items, next_cursor}", "List and search users", query: ["email: substring, case-insensitive", "limit: 1-200", "cursor: from next_cursor"];
        patch "/v1/admin/users/{id}" => admin::patch_user, Admin, 200 "User", "Disable or enable, promote or demote", body: "{status?, role?}";
        get "/v1/plans" => metering::plans, Public, 200 "{items}", "Plans for sale";
        get "/v1/quota" => metering::quota, User, 200 "Quota view", "The caller's plan and quotas for an app", query: ["app: app id"];
        get "/v1/usage" => metering::usage, User, 200 "{items, next_cursor}", "The caller's usage per period and route, newest period first", query: ["app", "type", "route: METHOD /pattern", "granularity: minute|hour|day|month (default day)", "from: RFC 3339", "to: RFC 3339", "limit: 1-200", "cursor: from next_cursor"];
        get "/v1/admin/users/{id}/quota" => metering::admin_user_quota, Admin, 200 "Quota view", "A user's quota view", query: ["app: app id"];
        get "/v1/admin/users/{id}/usage" => metering::admin_user_usage, Admin, 200 "{items, next_cursor}", "A user's usage, as /v1/usage", query: ["app", "type", "route: METHOD /pattern", "granularity: minute|hour|day|month (default day)", "from: RFC 3339", "to: RFC 3339", "limit: 1-200", "cursor: from next_cursor"];
        post "/v1/admin/users/{id}/grants" => metering::grant, Admin, 201 "The grant", "Add to a user's limit for the current window", body: "{app, type, amount, reason}", idempotent: true;
        post "/v1/admin/users/{id}/reset" => metering::reset, Admin, 204 "Reset", "Set the current window's used to 0", body: "{app, type}", idempotent: true;
        post "/v1/admin/apps" => metering::create_app, Admin, 201 "The app", "Register an app", body: "{id, name, time_zone?}";
        post "/v1/admin/apps/{app}/quota-types" => metering::create_quota_type, Admin, 201 "The quota type", "Add a quota type to an app", body: "{key, name, unit, window}";
        put "/v1/admin/plans/{id}" => metering::put_plan, Admin, 200 "The plan", "Create or replace a plan", body: "{name, price:{amount, currency}, period, public?, quotas:[{app, type, limit}]}", idempotent: true;
        get "/v1/orders" => payments::list, User, 200 "{items, next_cursor}", "The caller's orders, newest first", query: ["limit: 1-200", "cursor: from next_cursor"];
        post "/v1/orders" => payments::create, User, 201 "Order", "Order a plan", body: "{plan_id, channel}", idempotent: true;
        get "/v1/orders/{id}" => payments::get, User, 200 "Order", "An order (what a checkout page polls)";
        get "/v1/orders/{id}/qr.svg" => payments::qr_svg, User, 200 "image/svg+xml", "QR code of a WeChat order's code_url";
        get "/v1/orders/{id}/qr.png" => payments::qr_png, User, 200 "image/png", "QR code of a WeChat order's code_url";
        post "/v1/payments/alipay/notify" => payments::alipay_notify, Gateway, 200 "success", "Alipay asynchronous notification (form, RSA2)";
        post "/v1/payments/wechat/notify" => payments::wechat_notify, Gateway, 204 "Handled", "WeChat Pay v3 notification (signed, AES-256-GCM resource)";
        post "/v1/admin/orders/{id}/refund" => payments::admin_refund, Admin, 200 "Order", "Refund a paid order in full";
        get "/checkout" => payments::checkout, Public, 200 "text/html", "The checkout page";
        get "/account" => pages::account, Public, 200 "text/html", "The account page: plan, quotas, usage, API keys, orders";
    };
    let document = std::sync::Arc::new(openapi::document(&ops, &state.config.public_url));
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let document = document.clone();
                async move { axum::Json((*document).clone()) }
            }),
        )
        // Inside routing, so the matched route template is known.
        .route_layer(middleware::from_fn(label_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // The framework's own refusals get the contract's error body.
        .layer(middleware::from_fn(hygiene::error_bodies))
        // Before routing: no handler ever sees a path or query with NUL or other controls.
        .layer(middleware::from_fn(hygiene::reject_bad_text))
        // Outermost: every response, including 404s and rejections, gets a request id, a
        // metric and a log line.
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The sidecars' calls, served on the internal listener only (`internal_listen`): nothing under
/// `/internal/` exists on the public one.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/internal/users/{id}/sync",
            axum::routing::post(internal::sync_user),
        )
        .route("/healthz", get(ops::healthz))
        .route_layer(middleware::from_fn(label_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(1024))
        .layer(middleware::from_fn(hygiene::error_bodies))
        .layer(middleware::from_fn(hygiene::reject_bad_text))
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

    // Every log line of the request carries its id (JSON logs include the current span).
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span).await.into_response();

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
