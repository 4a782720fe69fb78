//! A stand-in for the iDoctor CT service behind the sidecar. It trusts the `X-User-Id` header
//! that the sidecar forwards and keeps each user's results and uploads apart by it. A patient id
//! of `fail` makes it answer 500, so that refunds can be shown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Largest upload accepted; the demo keeps uploads in memory.
pub const MAX_UPLOAD: usize = 256 << 20;

#[derive(Default)]
struct Store {
    results: HashMap<String, Vec<Value>>,
    uploads: HashMap<String, Upload>,
}

struct Upload {
    owner: String,
    data: Bytes,
}

#[derive(Clone, Default)]
pub struct Demo {
    store: Arc<Mutex<Store>>,
}

pub fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/process/{patient}/{date}", post(process))
        .route("/l3/{patient}", post(l3))
        .route("/muscle/{patient}", post(muscle))
        .route(
            "/upload",
            post(upload).layer(DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/uploads/{id}", get(download))
        .route("/results/{patient}", get(results))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(Demo::default())
}

/// Serves until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer in Tollgate's error format.
struct Problem(StatusCode, &'static str, &'static str);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

fn error(status: StatusCode, code: &'static str, message: &'static str) -> Response {
    Problem(status, code, message).into_response()
}

/// The caller, as the sidecar vouches for it.
fn user(headers: &HeaderMap) -> Result<String, Problem> {
    headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .ok_or(Problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "X-User-Id is missing: call this app through the Tollgate sidecar",
        ))
}

fn check_patient(patient: &str) -> Result<(), Problem> {
    if patient == "fail" {
        return Err(Problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "analysis_failed",
            "the analysis failed (patient id `fail` always fails, to show refunds)",
        ));
    }
    if patient.is_empty()
        || patient.len() > 64
        || !patient
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            "invalid_patient",
            "patient ids are 1-64 letters, digits, '-' or '_'",
        ));
    }
    Ok(())
}

/// Stable pseudo-measurements derived from the inputs, so a result can be checked in a test.
fn measure(parts: &[&str]) -> (u64, f64, f64) {
    let digest = Sha256::digest(parts.join("/").as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    let slice = 40 + n % 60;
    let area = 100.0 + (n % 10_000) as f64 / 100.0;
    let density = 20.0 + (n % 3_000) as f64 / 100.0;
    (slice, area, density)
}

#[derive(Serialize)]
struct Recorded {
    id: String,
    kind: &'static str,
    patient: String,
    #[serde(flatten)]
    values: Value,
}

impl Demo {
    fn record(&self, user: &str, kind: &'static str, patient: &str, values: Value) -> Value {
        let record = serde_json::to_value(Recorded {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            patient: patient.to_owned(),
            values,
        })
        .unwrap_or(Value::Null);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store
            .results
            .entry(user.to_owned())
            .or_default()
            .push(record.clone());
        record
    }
}

async fn process(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Path((patient, date)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let user = user(&headers)?;
    check_patient(&patient)?;
    let (slice, area, density) = measure(&[&patient, &date]);
    let values = json!({"date": date, "l3_slice": slice, "skeletal_muscle_area_cm2": area, "muscle_density_hu": density});
    Ok(Json(demo.record(&user, "full_process", &patient, values)))
}

async fn l3(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Path(patient): Path<String>,
) -> Result<Json<Value>, Problem> {
    let user = user(&headers)?;
    check_patient(&patient)?;
    let (slice, _, _) = measure(&[&patient]);
    let values = json!({"l3_slice": slice});
    Ok(Json(demo.record(&user, "l3_detect", &patient, values)))
}

async fn muscle(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Path(patient): Path<String>,
) -> Result<Json<Value>, Problem> {
    let user = user(&headers)?;
    check_patient(&patient)?;
    let (_, area, density) = measure(&[&patient]);
    let values = json!({"skeletal_muscle_area_cm2": area, "muscle_density_hu": density});
    Ok(Json(demo.record(&user, "muscle_seg", &patient, values)))
}

async fn upload(State(demo): State<Demo>, headers: HeaderMap, body: Bytes) -> Response {
    let user = match user(&headers) {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let size = body.len();
    demo.store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .uploads
        .insert(
            id.clone(),
            Upload {
                owner: user,
                data: body,
            },
        );
    (StatusCode::CREATED, Json(json!({"id": id, "size": size}))).into_response()
}

async fn download(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let user = match user(&headers) {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let store = demo.store.lock().unwrap_or_else(|p| p.into_inner());
    match store.uploads.get(&id) {
        // Another user's upload is indistinguishable from a missing one.
        Some(upload) if upload.owner == user => (
            [("content-type", "application/octet-stream")],
            upload.data.clone(),
        )
            .into_response(),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such upload"),
    }
}

async fn results(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Path(patient): Path<String>,
) -> Response {
    let user = match user(&headers) {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let store = demo.store.lock().unwrap_or_else(|p| p.into_inner());
    let items: Vec<&Value> = store
        .results
        .get(&user)
        .map(|all| {
            all.iter()
                .filter(|r| r.get("patient").and_then(Value::as_str) == Some(patient.as_str()))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({"items": items})).into_response()
}
