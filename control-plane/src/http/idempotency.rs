//! `Idempotency-Key` for the writes that honour it (orders, admin grants, resets and plan
//! changes), with Stripe's semantics: the key belongs to the caller; the first request that
//! succeeds stores its answer; for 24 hours the same key with the same request (route and body)
//! gets that answer back, with `Idempotent-Replayed: true`, without the work being done again;
//! the same key with another route or body is `422 idempotency_key_reused`. A request that fails
//! stores nothing, so its retry is tried afresh. Two retries at once: the second waits for the
//! first's transaction and then replays its answer.
//!
//! A handler takes [`Idempotent<T>`] instead of `Json<T>` and hands the use case to
//! [`Idempotent::run`], which does it in one transaction with the key's record.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::AppError;
use super::extract::Json;
use crate::app::{self, AppState, Failure, Tx};
use crate::db::idempotency::{self, Claim};

pub const HEADER: &str = "idempotency-key";
/// Set on an answer that is a replay of the first one.
pub const REPLAYED: &str = "idempotent-replayed";

/// A JSON body of type `T`, with the request's `Idempotency-Key` (if it sent one) and what the
/// key is bound to: the route as sent and a hash of the body as canonical JSON, so that
/// re-serialising the same object (other key order, other spacing) is still the same request.
pub struct Idempotent<T> {
    pub body: T,
    key: Option<String>,
    request: String,
    body_hash: [u8; 32],
}

/// The `Idempotency-Key` header: absent, or 1 to 255 visible ASCII characters.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, AppError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(|v| Some(v.to_owned()))
        .ok_or_else(|| {
            AppError::invalid("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })
}

impl<S, T> FromRequest<S> for Idempotent<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let key = key_of(req.headers())?;
        let request = format!("{} {}", req.method(), req.uri().path());
        let Json(value) = Json::<Value>::from_request(req, state).await?;
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        let body_hash = Sha256::digest(canonical.as_bytes()).into();
        let body = serde_json::from_value(value)
            .map_err(|e| AppError::invalid(format!("invalid request body: {e}")))?;
        Ok(Idempotent {
            body,
            key,
            request,
            body_hash,
        })
    }
}

/// JSON with object keys sorted and no insignificant whitespace.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn answer(status: StatusCode, body: Vec<u8>) -> Response {
    if body.is_empty() {
        status.into_response()
    } else {
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

impl<T> Idempotent<T> {
    /// Does `work` (a use case, in the transaction it is given) once per key: a replay answers
    /// the first answer without doing it; otherwise its result is answered with `status` (no
    /// body for `204`) and stored with the key in the same transaction. A failure that
    /// [`keeps_writes`](Failure::keeps_writes) commits its writes and gives the key up.
    pub async fn run<R: Serialize, E: Failure>(
        &self,
        state: &AppState,
        user: Uuid,
        status: StatusCode,
        work: impl AsyncFnOnce(&mut Tx<'_>, &T) -> Result<R, E>,
    ) -> Result<Response, AppError> {
        let mut client = app::conn(state).await?;
        let mut tx = Tx::begin(&mut client, &state.sync).await?;
        if let Some(replay) = self.begin(&tx, user).await? {
            return Ok(replay);
        }
        let answer = match work(&mut tx, &self.body).await {
            Ok(answer) => answer,
            Err(e) if e.keeps_writes() => {
                self.release(&tx, user).await?;
                tx.commit().await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let body = (status != StatusCode::NO_CONTENT).then_some(&answer);
        let response = self.finish(&tx, user, status, body).await?;
        tx.commit().await?;
        Ok(response)
    }

    /// Claims the key in `tx` (no key: nothing to do). `None`: do the work. `Some`: answer
    /// that instead (the first answer, replayed). `422` when the key was used for another
    /// request.
    async fn begin(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        user: Uuid,
    ) -> Result<Option<Response>, AppError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let claim = idempotency::claim(
            tx,
            &idempotency::Request {
                user,
                key,
                request: &self.request,
                body_hash: &self.body_hash,
            },
        )
        .await?;
        match claim {
            Claim::New => Ok(None),
            Claim::Replay { status, body } => {
                let status = StatusCode::from_u16(status).map_err(AppError::internal)?;
                let mut response = answer(status, body);
                response
                    .headers_mut()
                    .insert(REPLAYED, HeaderValue::from_static("true"));
                Ok(Some(response))
            }
            Claim::Mismatch => Err(AppError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request in the last 24 hours; \
                 send a new key with a new request",
            )),
        }
    }

    /// The answer of the work done since [`begin`](Self::begin), stored with the key (if any)
    /// in `tx`; commit `tx` next, then send it.
    async fn finish(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        user: Uuid,
        status: StatusCode,
        body: Option<&impl Serialize>,
    ) -> Result<Response, AppError> {
        let bytes = match body {
            Some(body) => serde_json::to_vec(body).map_err(AppError::internal)?,
            None => Vec::new(),
        };
        if let Some(key) = &self.key {
            idempotency::complete(tx, user, key, status.as_u16(), &bytes).await?;
        }
        Ok(answer(status, bytes))
    }

    /// Gives the key up in `tx`, for failed work that still commits what it did: a retry then
    /// does the work again.
    async fn release(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        user: Uuid,
    ) -> Result<(), AppError> {
        if let Some(key) = &self.key {
            idempotency::release(tx, user, key).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let check = |text: &str, want: &str| {
            let mut out = String::new();
            write_canonical(&serde_json::from_str(text).expect("json"), &mut out);
            assert_eq!(out, want, "{text}");
        };
        check(
            r#"{"b":1, "a":{"d":[1, {"z":null,"y":"é"}],"c":true}}"#,
            r#"{"a":{"c":true,"d":[1,{"y":"é","z":null}]},"b":1}"#,
        );
        check(r#"  "x\"y" "#, r#""x\"y""#);
        check("[]", "[]");
        check(r#"{"a\u0000":1.5}"#, r#"{"a\u0000":1.5}"#);
    }

    #[test]
    fn keys_are_visible_ascii_up_to_255() {
        let check = |value: &str, ok: bool| {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER, HeaderValue::from_str(value).expect("header"));
            assert_eq!(key_of(&headers).is_ok(), ok, "{value:?}");
        };
        check("retry-1", true);
        check(&"k".repeat(255), true);
        check(&"k".repeat(256), false);
        check("", false);
        check("has space", false);
        assert_eq!(key_of(&HeaderMap::new()).expect("absent"), None);
    }
}
