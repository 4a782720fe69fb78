//! The service's operational surface: health, readiness, metrics, request ids and the error
//! format for unknown routes.

mod support;

use support::{TestDb, config, serve};

#[tokio::test]
async fn ops_endpoints_and_error_format() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let http = reqwest::Client::new();

    let health = http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));

    let ready = http
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    let missing = http
        .get(format!("{}/v1/nothing-here", server.base))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .expect("404");
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-request-id"], "client-id-42");
    let body: serde_json::Value = missing.json().await.expect("json body");
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());

    // An insane client id is replaced, not echoed.
    let replaced = http
        .get(format!("{}/healthz", server.base))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .expect("healthz");
    let id = replaced.headers()["x-request-id"].to_str().expect("ascii");
    assert_ne!(id, "bad id with spaces");
    assert_eq!(id.len(), 32);

    let wrong_method = http
        .delete(format!("{}/healthz", server.base))
        .send()
        .await
        .expect("405");
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.expect("json body");
    assert_eq!(body["error"]["code"], "method_not_allowed");

    let metrics = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("# TYPE tollgate_cp_http_requests_total counter"));
    assert!(metrics.contains(r#"route="/healthz""#), "{metrics}");
    assert!(metrics.contains(r#"status="404""#), "{metrics}");
}

#[tokio::test]
async fn readiness_fails_while_redis_is_unreachable() {
    let db = TestDb::migrated().await;
    let mut config = config(&db);
    // Nothing listens on port 1.
    config.redis_url = tollgate_common::config::Secret::new("redis://127.0.0.1:1");
    let server = serve(config).await;
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_ready");
    assert_eq!(body["error"]["details"]["postgres"], "ok");
    assert_ne!(body["error"]["details"]["redis"], "ok");
    // Liveness is independent of the backends.
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn openapi_document_covers_the_contract() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let doc: serde_json::Value = reqwest::get(format!("{}/v1/openapi.json", server.base))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    // Every call of API.md's control-plane tables.
    for (method, path) in [
        ("post", "/v1/auth/register"),
        ("post", "/v1/auth/login"),
        ("post", "/v1/auth/refresh"),
        ("post", "/v1/auth/logout"),
        ("get", "/v1/me"),
        ("get", "/.well-known/jwks.json"),
        ("post", "/v1/api-keys"),
        ("get", "/v1/api-keys"),
        ("delete", "/v1/api-keys/{id}"),
        ("get", "/v1/plans"),
        ("get", "/v1/quota"),
        ("get", "/v1/usage"),
        ("post", "/v1/orders"),
        ("get", "/v1/orders/{id}"),
        ("get", "/v1/orders/{id}/qr.svg"),
        ("post", "/v1/payments/alipay/notify"),
        ("post", "/v1/payments/wechat/notify"),
        ("get", "/v1/admin/users"),
        ("patch", "/v1/admin/users/{id}"),
        ("get", "/v1/admin/users/{id}/quota"),
        ("post", "/v1/admin/users/{id}/grants"),
        ("post", "/v1/admin/users/{id}/reset"),
        ("post", "/v1/admin/apps"),
        ("post", "/v1/admin/apps/{app}/quota-types"),
        ("put", "/v1/admin/plans/{id}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(
            op.is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
        assert!(op["responses"].is_object());
    }
    assert_eq!(doc["paths"]["/v1/admin/users"]["get"]["x-access"], "admin");
    assert_eq!(
        doc["paths"]["/v1/me"]["get"]["security"][0],
        serde_json::json!({"bearer": []})
    );
}
