//! Issue 13: what an attacker could still do to the control plane, and what must keep holding.
//! Each test is a case of the issue; the payment-notification flood is in `payments.rs`, login
//! throttling and future `iat` in `identity.rs`, memory in `memory.rs`, TLS in `tls.rs`.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use support::{Api, Cred, TestDb, config, config_with, make_admin, serve};

const PW: &str = "correct horse battery";

fn assert_error(status: u16, body: &Value, want: u16, code: &str, what: &str) {
    assert_eq!(status, want, "{what}: {body:?}");
    assert_eq!(body["error"]["code"], code, "{what}: {body:?}");
    assert!(body["error"]["message"].is_string(), "{what}: {body:?}");
}

#[tokio::test]
async fn internal_endpoints_are_not_on_the_public_listener() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let (id, _, _) = api.register("synced@example.com", PW).await;
    let http = reqwest::Client::new();
    for path in [
        format!("/internal/users/{id}/sync"),
        "/internal/users/x/sync".to_owned(),
        "/internal/".to_owned(),
        format!("/internal/users/{id}/sync/"),
        format!("/INTERNAL/users/{id}/sync"),
        format!("/v1/../internal/users/{id}/sync"),
        format!("/%69nternal/users/{id}/sync"),
    ] {
        let r = http
            .post(format!("{}{path}", server.base))
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            matches!(status, 400 | 404),
            "{path} on the public port: {status} {body:?}"
        );
    }
    // The internal listener serves it (to the sidecars), and nothing of the public API.
    let r = http
        .post(format!("{}/internal/users/{id}/sync", server.internal))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let r = http
        .get(format!("{}/v1/plans", server.internal))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    // The OpenAPI document no longer lists it.
    let doc = api.get("/v1/openapi.json", Cred::None).await;
    assert!(
        doc.body["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .all(|p| !p.starts_with("/internal"))
    );
}

#[tokio::test]
async fn nul_and_control_characters_are_a_400_never_a_500() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let (_, token, _) = api.register("plain@example.com", PW).await;
    let admin = make_admin(&db, &api, "plain@example.com", PW).await;
    for path in [
        "/v1/quota?app=%00",
        "/v1/usage?type=%00",
        "/v1/usage?app=idoctor&route=%00",
        "/v1/admin/users?email=%00",
        "/v1/admin/users?email=a%1b%5b31m",
        "/v1/admin/users?email=%ff%fe",
        "/v1/admin/users/%00",
        "/v1/orders/TG%00",
        "/v1/admin/users/00000000-0000-0000-0000-000000000000/quota?app=%00",
        "/v1/plans?x=%00",
    ] {
        let reply = api.get(path, Cred::Bearer(&admin)).await;
        assert_error(reply.status, &reply.body, 400, "invalid_request", path);
    }
    let users_before: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    for (path, body) in [
        (
            "/v1/auth/register",
            json!({"email": "nul\u{0}@example.com", "password": PW}),
        ),
        (
            "/v1/auth/register",
            json!({"email": "ok@example.com", "password": "pass\u{0}word!!"}),
        ),
        (
            "/v1/auth/login",
            json!({"email": "plain@example.com", "password": "x\u{0}"}),
        ),
        ("/v1/api-keys", json!({"name": "key\u{0}"})),
        ("/v1/api-keys", json!({"name": "bell\u{7}"})),
        (
            "/v1/orders",
            json!({"plan_id": "pro\u{0}", "channel": "alipay_page"}),
        ),
    ] {
        let reply = api.post(path, Cred::Bearer(&token), body.clone()).await;
        assert_error(
            reply.status,
            &reply.body,
            400,
            "invalid_request",
            &body.to_string(),
        );
    }
    let reply = api
        .post(
            "/v1/admin/apps",
            Cred::Bearer(&admin),
            json!({"id": "app\u{0}", "name": "x"}),
        )
        .await;
    assert_error(
        reply.status,
        &reply.body,
        400,
        "invalid_request",
        "admin app",
    );
    let users_after: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(users_before, users_after, "nothing was created");

    // 100,000-deep JSON: a 400, not a stack overflow.
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let r = api
        .http
        .post(format!("{}/v1/auth/register", api.base))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json");
    assert_error(status, &body, 400, "invalid_request", "deep json");
}

#[tokio::test]
async fn one_account_per_address_whatever_its_unicode_form() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let composed = "jos\u{e9}@example.com";
    api.register(composed, PW).await;
    for other in [
        "jose\u{301}@example.com",                    // decomposed
        "\u{ff4a}\u{ff4f}\u{ff53}\u{e9}@example.com", // full-width letters
        "JOS\u{c9}@EXAMPLE.COM",
        "Jose\u{301}@Example.com",
    ] {
        let reply = api
            .post(
                "/v1/auth/register",
                Cred::None,
                json!({"email": other, "password": PW}),
            )
            .await;
        assert_error(reply.status, &reply.body, 409, "email_taken", other);
        let login = api
            .post(
                "/v1/auth/login",
                Cred::None,
                json!({"email": other, "password": PW}),
            )
            .await;
        assert_eq!(login.status, 200, "{other}: {:?}", login.body);
        assert_eq!(login.body["user"]["email"], composed, "stored in NFC");
    }
    let rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1);
    // A different address is a different account.
    api.register("jose@example.com", PW).await;
}

#[tokio::test]
async fn password_hashing_is_bounded_and_a_full_queue_is_a_503() {
    let db = TestDb::migrated().await;
    let server = serve(config_with(
        &db,
        &[
            ("TOLLGATE_HASH_CONCURRENCY", "1"),
            ("TOLLGATE_HASH_QUEUE", "1"),
            ("TOLLGATE_LOGIN_MAX_FAILURES_CLIENT", "1000"),
            ("TOLLGATE_LOGIN_MAX_FAILURES_ACCOUNT", "1000"),
        ],
    ))
    .await;
    let api = Api::new(&server.base);
    api.register("burst@example.com", PW).await;
    let calls = (0..16).map(|_| {
        let api = &api;
        async move {
            api.post(
                "/v1/auth/login",
                Cred::None,
                json!({"email": "burst@example.com", "password": PW}),
            )
            .await
        }
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut busy = 0;
    for r in &replies {
        match r.status {
            200 => {}
            503 => {
                busy += 1;
                assert_error(r.status, &r.body, 503, "busy", "full queue");
                assert_eq!(r.headers["retry-after"], "1");
            }
            other => panic!("{other}: {:?}", r.body),
        }
    }
    assert!(busy > 0, "16 at once with 1 slot and 1 waiting place");
    assert!(busy < 16, "some got through");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = api
        .post(
            "/v1/auth/login",
            Cred::None,
            json!({"email": "burst@example.com", "password": PW}),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn twenty_thousand_guessed_api_keys_are_all_refused() {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let (_, token, _) = api.register("keyed@example.com", PW).await;
    let real = api
        .post(
            "/v1/api-keys",
            Cred::Bearer(&token),
            json!({"name": "real"}),
        )
        .await;
    assert_eq!(real.status, 201);
    let guesses: Vec<String> = (0..20_000)
        .map(|_| tollgate_common::api_key::generate())
        .collect();
    let api = &api;
    let statuses: Vec<u16> = futures_util::stream::iter(guesses.iter())
        .map(|key| async move { api.get("/v1/me", Cred::Key(key)).await.status })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 401), "every guess is a 401");
    let key = real.body["key"].as_str().expect("key");
    assert_eq!(api.get("/v1/me", Cred::Key(key)).await.status, 200);
}

use futures_util::StreamExt;

/// Every route of the OpenAPI document, with random bytes in its query string and body, never
/// answers 5xx; as an admin, so that handlers past authentication run too.
#[test]
fn random_bytes_at_every_route_never_make_a_500() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_db, server, admin, routes) = runtime.block_on(async {
        let db = TestDb::migrated().await;
        let server = serve(config_with(
            &db,
            &[
                ("TOLLGATE_LOGIN_MAX_FAILURES_CLIENT", "100000"),
                ("TOLLGATE_LOGIN_MAX_FAILURES_ACCOUNT", "100000"),
            ],
        ))
        .await;
        let api = Api::new(&server.base);
        api.register("fuzz@example.com", PW).await;
        let admin = make_admin(&db, &api, "fuzz@example.com", PW).await;
        let doc = api.get("/v1/openapi.json", Cred::None).await;
        let mut routes = Vec::new();
        for (path, ops) in doc.body["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("ops").keys() {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
        assert!(routes.len() >= 30, "{routes:?}");
        (db, server, admin, routes)
    });
    let http = reqwest::Client::new();
    let count = routes.len();
    // PROPTEST_CASES=N for a longer run.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let mut config = ProptestConfig::with_cases(cases);
    config.failure_persistence = None;
    proptest!(config, |(
        route in 0..count,
        segment in proptest::collection::vec(any::<u8>(), 0..40),
        query in proptest::collection::vec(any::<u8>(), 0..200),
        body in proptest::collection::vec(any::<u8>(), 0..600),
        text in any::<String>(),
        shape in 0..4u8,
    )| {
        let (method, template) = &routes[route];
        let percent = |bytes: &[u8]| bytes.iter().map(|b| format!("%{b:02X}")).collect::<String>();
        // Path parameters: random bytes, percent-encoded.
        let path: String = template
            .split('/')
            .map(|s| if s.starts_with('{') { percent(&segment) } else { s.to_owned() })
            .collect::<Vec<_>>()
            .join("/");
        let query = match shape {
            0 => percent(&query),
            1 => format!("app={}&type={}&email={}&limit={}&cursor={}", percent(&query), percent(text.as_bytes()), percent(&segment), percent(&segment), percent(&query)),
            _ => query.iter().filter(|b| b.is_ascii_graphic() && **b != b'#').map(|b| *b as char).collect(),
        };
        let body = match shape {
            0 | 1 => body,
            2 => json!({"email": text, "password": text, "name": text, "id": text, "key": text,
                        "plan_id": text, "channel": text, "app": text, "type": text,
                        "amount": text, "reason": text, "status": text, "role": text}).to_string().into_bytes(),
            _ => serde_json::to_vec(&json!({"email": format!("{text}@example.com"), "password": text, "name": text, "expires_at": text})).expect("json"),
        };
        let url = format!("{}{}?{}", server.base, path, query);
        let status = runtime.block_on(async {
            let request = http
                .request(method.parse().expect("method"), &url)
                .bearer_auth(&admin)
                .header("content-type", if shape == 0 { "application/x-www-form-urlencoded" } else { "application/json" })
                .body(body);
            match request.send().await {
                Ok(r) => Some(r.status().as_u16()),
                // A URL reqwest itself refuses to send never reached us.
                Err(e) if e.is_builder() => None,
                Err(e) => panic!("{method} {url}: {e}"),
            }
        });
        if let Some(status) = status {
            prop_assert!(status < 500, "{} {} answered {}", method, url, status);
        }
    });
}
