//! The service's operational surface: health, readiness, metrics, request ids and the error
//! format for unknown routes.

mod support;

use support::{Api, Cred, TestDb, config, serve};

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
    // Every call of docs/api.md's control-plane tables.
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

/// docs/api.md is the reference as built: every operation of the OpenAPI document is named in it
/// as `METHOD /path` (in backticks), and every control-plane path it names exists.
#[tokio::test]
async fn docs_api_md_covers_every_route_of_the_openapi_document() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let doc: serde_json::Value = reqwest::get(format!("{}/v1/openapi.json", server.base))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let reference = std::fs::read_to_string(path).expect("docs/api.md");
    let mut documented = std::collections::BTreeSet::new();
    let mut missing = Vec::new();
    for (route, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            let name = format!("`{} {route}", method.to_uppercase());
            // `GET /v1/quota?app=ID` and `POST /v1/orders` `{…}` both name their route.
            if !(reference.contains(&format!("{name}`")) || reference.contains(&format!("{name}?")))
            {
                missing.push(name.trim_start_matches('`').to_owned());
            }
            documented.insert(format!("{} {route}", method.to_uppercase()));
        }
    }
    assert!(
        missing.is_empty(),
        "routes of /v1/openapi.json not in docs/api.md (add a row for each): {missing:?}"
    );
    // The other way: a control-plane route named in the reference that is not served. The
    // internal listener's routes are not in the public OpenAPI document; they are the ones
    // `internal_router` serves.
    let internal = ["POST /internal/users/{id}/sync"];
    let named = routes_named(&reference);
    let stale: Vec<_> = named
        .iter()
        .filter(|r| {
            !documented.contains(*r)
                && r.as_str() != "GET /v1/openapi.json"
                && !internal.contains(&r.as_str())
        })
        .collect();
    assert!(
        stale.is_empty(),
        "docs/api.md names routes the control plane does not serve: {stale:?}"
    );
}

/// Every "`METHOD /v1/…`" or "`METHOD /internal/…`" in a text, up to a `?`, space or backtick.
fn routes_named(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        for prefix in ["/v1/", "/internal/"] {
            let needle = format!("`{method} {prefix}");
            let mut rest = text;
            while let Some(at) = rest.find(&needle) {
                // After "`METHOD ": the path, up to a backtick, a query or a space.
                let tail = &rest[at + needle.len() - prefix.len()..];
                let end = tail.find(['`', '?', ' ']).unwrap_or(tail.len());
                out.push(format!("{method} {}", &tail[..end]));
                rest = &tail[end..];
            }
        }
    }
    out
}

/// Access is enforced from the table that documents it: every route the OpenAPI document marks
/// `user` or `admin` refuses a call without credentials (`401`), every `admin` one a plain
/// user's (`403`), and no other route asks for credentials.
#[tokio::test]
async fn every_route_is_guarded_as_its_document_says() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let (_, token, _) = api
        .register("plain@example.com", "correct horse battery")
        .await;
    let doc = api.get("/v1/openapi.json", Cred::None).await.body;
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (template, operations) in paths {
        // Any id: access is decided before the path is looked at.
        let path = template
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "0f0e0d0c-0b0a-0908-0706-050403020100"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, operation) in operations.as_object().expect("operations") {
            let access = operation["x-access"].as_str().expect("x-access");
            let method: reqwest::Method = method.to_uppercase().parse().expect("method");
            let body = (method != reqwest::Method::GET && method != reqwest::Method::DELETE)
                .then(|| serde_json::json!({}));
            let call = |cred| api.call(method.clone(), &path, cred, body.clone());
            let anonymous = call(Cred::None).await;
            let what = format!("{method} {template} ({access})");
            match access {
                "user" | "admin" => {
                    assert_eq!(anonymous.status, 401, "{what}: {:?}", anonymous.body);
                    assert_eq!(anonymous.body["error"]["code"], "unauthorized", "{what}");
                }
                // A gateway's own protocol may answer 401 to a bad signature.
                "public" => assert_ne!(anonymous.status, 401, "{what}: {:?}", anonymous.body),
                _ => {}
            }
            if access == "admin" {
                let user = call(Cred::Bearer(&token)).await;
                assert_eq!(user.status, 403, "{what}: {:?}", user.body);
                assert_eq!(user.body["error"]["code"], "forbidden", "{what}");
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} operations in the document");
}
