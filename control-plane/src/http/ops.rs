//! Operations endpoints: `/healthz` (the process is alive), `/readyz` (PostgreSQL and Redis
//! answer) and `/metrics` (Prometheus text format).

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::AppError;

const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let (postgres, redis) = tokio::join!(check_postgres(&state), check_redis(&state));
    if postgres.is_ok() && redis.is_ok() {
        return axum::Json(json!({"status": "ready"})).into_response();
    }
    let describe = |r: Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e,
    };
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "a backend is unreachable",
    )
    .with_details(json!({"postgres": describe(postgres), "redis": describe(redis)}))
    .into_response()
}

async fn check_postgres(state: &AppState) -> Result<(), String> {
    let check = async {
        let client = state.db.get().await.map_err(|e| e.to_string())?;
        crate::db::ping(&client).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

async fn check_redis(state: &AppState) -> Result<(), String> {
    crate::redis::ping(&state.redis, CHECK_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
