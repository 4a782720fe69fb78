//! The admin listener: `/healthz`, `/readyz` (JWKS loaded and Redis reachable) and `/metrics`.
//! Never on the proxy listener.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tollgate_common::error::ErrorBody;

use crate::{Body, Shared, full_body};

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    // Every response of both programs carries a request id, these too.
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
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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

async fn answer(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
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
