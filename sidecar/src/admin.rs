//! The admin listener: `/healthz`, `/readyz` (JWKS loaded and Redis reachable) and `/metrics`.
//! Never on the proxy listener. It has limits of its own ([`limits`]), small and fixed: a few
//! probes and scrapers use it, and it must answer whatever the proxy listener suffers.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use serde_json::json;
use tollgate_common::error::ErrorBody;
use tollgate_serve::Limits;

use crate::{Body, RequestBody, Shared, full_body};

/// The admin listener's limits.
pub fn limits() -> Limits {
    Limits {
        max_connections: 64,
        max_in_flight: 64,
        idle_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(5),
        body_read_timeout: Duration::from_secs(5),
        max_header_bytes: 16 << 10,
        max_body_bytes: Some(0),
        grace: Duration::from_secs(1),
    }
}

/// Answers one admin request; every response carries a request id, as on every listener.
pub async fn handle(shared: Arc<Shared>, request: Request<RequestBody>) -> Response<Body> {
    let id = tollgate_common::request_id::choose(
        request
            .headers()
            .get(tollgate_common::request_id::HEADER)
            .map(|v| v.as_bytes()),
    );
    let mut response = answer(&shared, request).await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(tollgate_common::request_id::HEADER, value);
    }
    response
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn answer(shared: &Shared, request: Request<RequestBody>) -> Response<Body> {
    match request.uri().path() {
        "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"}).to_string()),
        "/readyz" => {
            let jwks = shared.auth.jwks_loaded();
            let redis = shared.store.ping(Duration::from_secs(1)).await;
            if jwks && redis.is_ok() {
                json_response(StatusCode::OK, json!({"status": "ready"}).to_string())
            } else {
                let body = ErrorBody::new("not_ready", "a dependency is not available")
                    .with_details(json!({
                        "jwks": if jwks { "ok" } else { "not loaded" },
                        "redis": redis.map_or_else(|e| e.to_string(), |()| "ok".to_owned()),
                    }));
                json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_json())
            }
        }
        "/metrics" => {
            let mut response = Response::new(full_body(shared.metrics.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        path => json_response(
            StatusCode::NOT_FOUND,
            ErrorBody::new("not_found", format!("no admin route {path}")).to_json(),
        ),
    }
}
