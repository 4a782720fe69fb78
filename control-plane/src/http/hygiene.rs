//! Input hygiene at the edge, once for every route: a path or query string that is not UTF-8 or
//! holds a control character (NUL included) is `400 invalid_request` before any handler runs, so
//! no such text reaches PostgreSQL (which refuses NUL with an error that would be a 500). JSON
//! bodies get the same check in the `Json` extractor ([`check_json_text`]). And every refusal
//! made by the framework rather than by a handler (a path that does not parse, a body over the
//! limit, a wrong method) is given the contract's error body.

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::error::AppError;

/// Percent-decodes `raw` (`+` stays a `+`: only what would change the bytes matters) and says
/// whether the result is UTF-8 text free of control characters.
fn clean(raw: &str) -> bool {
    let out: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    std::str::from_utf8(&out).is_ok_and(|text| !text.chars().any(char::is_control))
}

/// Refuses a request whose path or query string is not clean text.
pub async fn reject_bad_text(request: Request, next: Next) -> Response {
    let uri = request.uri();
    if !clean(uri.path()) {
        return AppError::invalid(
            "the path must be UTF-8 text without control characters (such as NUL)",
        )
        .into_response();
    }
    if let Some(query) = uri.query()
        && !clean(query)
    {
        return AppError::invalid(
            "the query string must be UTF-8 text without control characters (such as NUL)",
        )
        .into_response();
    }
    next.run(request).await
}

/// Gives refusals that carry no contract body (axum's own: path and method rejections, body
/// limits, unsupported media types) the contract's error body. The payment-notification routes
/// answer in the gateways' formats and are left alone.
pub async fn error_bodies(request: Request, next: Next) -> Response {
    let gateway = request.uri().path().starts_with("/v1/payments/");
    let response = next.run(request).await;
    let status = response.status();
    if gateway || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, _) = response.into_parts();
    let (code, message) = describe(status);
    let mut error = AppError::new(status, code, message);
    error.retry_after = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut fixed = error.into_response();
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(value) = parts.headers.get(&name) {
            fixed.headers_mut().insert(name, value.clone());
        }
    }
    fixed
}

/// The contract's code and a message for a status the framework produced.
pub fn describe(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("invalid_request", "the request is malformed"),
        StatusCode::NOT_FOUND => ("not_found", "no such route or object"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed here"),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this service accepts",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "invalid_request",
            "expected a body with Content-Type: application/json",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request headers are larger than this service accepts",
        ),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long to arrive"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("invalid_request", "the request was refused"),
    }
}

/// Walks a JSON document and fails on a string (key or value) with a control character; tab,
/// newline and carriage return are allowed in values (free text). Nesting depth is serde_json's
/// limit (128), so a 100,000-deep document fails here too, as a 400.
pub fn check_json_text(bytes: &[u8]) -> Result<(), String> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    deserializer
        .deserialize_any(TextCheck { key: false })
        .map_err(|e| e.to_string())
}

struct TextCheck {
    key: bool,
}

fn bad_char(key: bool, c: char) -> bool {
    c.is_control() && (key || !matches!(c, '\t' | '\n' | '\r'))
}

impl<'de> Visitor<'de> for TextCheck {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match v.chars().find(|c| bad_char(self.key, *c)) {
            Some(c) => Err(E::custom(format_args!(
                "text must not contain control characters (found U+{:04X})",
                c as u32
            ))),
            None => Ok(()),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(TextCheckSeed { key: false })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(TextCheckSeed { key: true })?.is_some() {
            map.next_value_seed(TextCheckSeed { key: false })?;
        }
        Ok(())
    }
}

struct TextCheckSeed {
    key: bool,
}

impl<'de> de::DeserializeSeed<'de> for TextCheckSeed {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(TextCheck { key: self.key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_path_text() {
        let check = |raw: &str, ok: bool| assert_eq!(clean(raw), ok, "{raw:?}");
        check("app=idoctor", true);
        check("email=jos%C3%A9%40example.com", true);
        check("app=%00", false);
        check("type=%1f", false);
        check("x=%7F", false);
        check("x=%C2%85", false); // NEL, a C1 control
        check("x=%ff", false); // not UTF-8
        check("x=%zz&y=%", true); // not an escape: literal text
        check("/v1/admin/users/%00", false);
    }

    #[tokio::test]
    async fn framework_refusals_get_the_contract_body() {
        use axum::extract::Path;
        use axum::routing::{get, post};
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route(
                "/n/{n}",
                get(|Path(n): Path<u32>| async move { n.to_string() }),
            )
            .route(
                "/big",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/v1/payments/alipay/notify",
                post(|| async { (StatusCode::BAD_REQUEST, "failure") }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(8))
            .layer(axum::middleware::from_fn(error_bodies));
        let call = |method: &str, uri: &str, body: &'static str| {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::from(body))
                .expect("request");
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.expect("response");
                let status = response.status().as_u16();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .expect("body");
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }
        };
        for (method, uri, body, status, code) in [
            ("GET", "/n/not-a-number", "", 400, "invalid_request"),
            (
                "POST",
                "/big",
                "more than eight bytes",
                413,
                "payload_too_large",
            ),
        ] {
            let (got, text) = call(method, uri, body).await;
            assert_eq!(got, status, "{uri}: {text}");
            let json: serde_json::Value = serde_json::from_str(&text).expect("a JSON body");
            assert_eq!(json["error"]["code"], code, "{uri}");
            assert!(json["error"]["message"].is_string());
        }
        assert_eq!(call("GET", "/n/7", "").await, (200, "7".to_owned()));
        // The gateways' formats stay theirs.
        let (status, text) = call("POST", "/v1/payments/alipay/notify", "").await;
        assert_eq!((status, text.as_str()), (400, "failure"));
    }

    #[test]
    fn json_text() {
        let check = |raw: &str, ok: bool| {
            assert_eq!(check_json_text(raw.as_bytes()).is_ok(), ok, "{raw:?}");
        };
        check(r#"{"email":"a@example.com","n":[1,2.5,null,true]}"#, true);
        check(r#"{"reason":"line one\nline two\ttab"}"#, true);
        check(r#"{"email":"a\u0000@example.com"}"#, false);
        check(r#"{"a":{"b":["\u001b[31m"]}}"#, false);
        check(r#"{"k\u0000":1}"#, false);
        check(r#"{"k\n":1}"#, false);
        check(r#"{"x":"\u0085"}"#, false);
        check(&"[".repeat(100_000), false);
    }
}
