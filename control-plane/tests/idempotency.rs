//! `Idempotency-Key` on the admin writes (grants, resets, plan changes) against real PostgreSQL
//! and Redis: a retry gets the first answer and changes nothing, two retries at once make one
//! record, another body under the same key is 422, keys are per caller and live 24 hours.
//! (Orders share the mechanism; their test is in payments.rs.)

mod support;

use serde_json::Value;
use support::{Api, Cred, TestDb, config, make_admin, serve};

const PW: &str = "correct horse battery";

struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

/// Sends `body` (raw text, so tests control its bytes) with an optional Idempotency-Key.
async fn send(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: &str,
) -> Answer {
    let mut request = api
        .http
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let text = response.text().await.expect("body");
    Answer {
        status,
        replayed,
        body: if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("json body")
        },
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

struct Harness {
    db: TestDb,
    api: Api,
    admin: String,
    user: String,
    _server: support::Server,
}

async fn start() -> Harness {
    let db = TestDb::migrated().await;
    let server = serve(config(&db)).await;
    let api = Api::new(&server.base);
    let (user, _, _) = api.register("customer@example.com", PW).await;
    api.register("boss@example.com", PW).await;
    let admin = make_admin(&db, &api, "boss@example.com", PW).await;
    Harness {
        db,
        api,
        admin,
        user,
        _server: server,
    }
}

#[tokio::test]
async fn a_retried_grant_is_applied_once() {
    let h = start().await;
    let path = format!("/v1/admin/users/{}/grants", h.user);
    let body = r#"{"app":"idoctor","type":"api_calls_full_process","amount":25,"reason":"support ticket 7"}"#;
    let post = |key, body| send(&h.api, reqwest::Method::POST, &path, &h.admin, key, body);

    let first = post(Some("grant-7"), body).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert!(!first.replayed);
    // The same request again, and the same object written another way: the first answer.
    for again in [
        body,
        r#"{ "reason": "support ticket 7", "amount": 25, "type": "api_calls_full_process", "app": "idoctor" }"#,
    ] {
        let retry = post(Some("grant-7"), again).await;
        assert_eq!(retry.status, 201);
        assert!(retry.replayed, "a replay says so");
        assert_eq!(retry.body, first.body, "the first answer, byte for byte");
    }
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 1);
    assert_eq!(
        count(
            &h.db,
            "SELECT count(*) FROM audit_log WHERE action = 'quota.grant'"
        )
        .await,
        1
    );
    let quota = h
        .api
        .get(
            &format!("/v1/admin/users/{}/quota?app=idoctor", h.user),
            Cred::Bearer(&h.admin),
        )
        .await;
    let limit = quota.body["quotas"]
        .as_array()
        .expect("quotas")
        .iter()
        .find(|q| q["type"] == "api_calls_full_process")
        .expect("listed")["limit"]
        .clone();
    assert_eq!(limit, 75, "50 of the free plan plus one grant of 25");

    // The same key with another body, or on another route: 422, and nothing changes.
    let other = post(
        Some("grant-7"),
        r#"{"app":"idoctor","type":"api_calls_full_process","amount":26,"reason":"support ticket 7"}"#,
    )
    .await;
    assert_eq!(other.status, 422, "{:?}", other.body);
    assert_eq!(other.body["error"]["code"], "idempotency_key_reused");
    let elsewhere = send(
        &h.api,
        reqwest::Method::POST,
        &format!("/v1/admin/users/{}/reset", h.user),
        &h.admin,
        Some("grant-7"),
        r#"{"app":"idoctor","type":"api_calls_full_process"}"#,
    )
    .await;
    assert_eq!(elsewhere.status, 422);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 1);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_resets").await, 0);

    // Without a key, every request is new work.
    assert_eq!(post(None, body).await.status, 201);
    assert_eq!(post(None, body).await.status, 201);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 3);

    // A request that fails stores nothing: its retry is tried afresh, and may succeed.
    let bad_type = r#"{"app":"idoctor","type":"nope","amount":1,"reason":"x"}"#;
    assert_eq!(post(Some("grant-8"), bad_type).await.status, 404);
    assert_eq!(
        count(
            &h.db,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'grant-8'"
        )
        .await,
        0
    );
    assert_eq!(post(Some("grant-8"), body).await.status, 201);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 4);

    // Bad keys are 400 before anything happens.
    let long = "k".repeat(256);
    assert_eq!(post(Some(&long), body).await.status, 400);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 4);
}

#[tokio::test]
async fn two_retries_at_once_make_one_grant() {
    let h = start().await;
    let path = format!("/v1/admin/users/{}/grants", h.user);
    let body = r#"{"app":"idoctor","type":"api_calls_l3_detect","amount":3,"reason":"race"}"#;
    for round in 0..5 {
        let key = format!("race-{round}");
        let retries = (0..4).map(|_| {
            send(
                &h.api,
                reqwest::Method::POST,
                &path,
                &h.admin,
                Some(&key),
                body,
            )
        });
        let answers = futures_util::future::join_all(retries).await;
        let first = &answers[0];
        for a in &answers {
            assert_eq!(a.status, 201, "{:?}", a.body);
            assert_eq!(
                a.body["id"], first.body["id"],
                "every retry gets the one grant"
            );
        }
        assert_eq!(
            answers.iter().filter(|a| !a.replayed).count(),
            1,
            "one did the work, the others replayed it"
        );
        assert_eq!(
            count(&h.db, "SELECT count(*) FROM quota_grants").await,
            round + 1
        );
    }
}

#[tokio::test]
async fn resets_and_plan_changes_are_idempotent_and_keys_are_per_caller() {
    let h = start().await;
    let reset = format!("/v1/admin/users/{}/reset", h.user);
    let body = r#"{"app":"idoctor","type":"api_calls_full_process"}"#;
    let first = send(
        &h.api,
        reqwest::Method::POST,
        &reset,
        &h.admin,
        Some("r1"),
        body,
    )
    .await;
    assert_eq!((first.status, first.replayed), (204, false));
    let again = send(
        &h.api,
        reqwest::Method::POST,
        &reset,
        &h.admin,
        Some("r1"),
        body,
    )
    .await;
    assert_eq!((again.status, again.replayed), (204, true));
    assert_eq!(again.body, Value::Null);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_resets").await, 1);

    let plan = r#"{"name":"Team","price":{"amount":4900,"currency":"CNY"},"period":"month","quotas":[{"app":"idoctor","type":"api_calls_full_process","limit":500}]}"#;
    let put = |key| {
        send(
            &h.api,
            reqwest::Method::PUT,
            "/v1/admin/plans/team",
            &h.admin,
            Some(key),
            plan,
        )
    };
    let created = put("plan-1").await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let replay = put("plan-1").await;
    assert!(replay.replayed);
    assert_eq!(replay.body, created.body);
    assert_eq!(
        count(
            &h.db,
            "SELECT count(*) FROM audit_log WHERE action = 'plan.put'"
        )
        .await,
        1
    );

    // Another admin's "r1" is another key: its work is done.
    h.api.register("other-boss@example.com", PW).await;
    let other = make_admin(&h.db, &h.api, "other-boss@example.com", PW).await;
    let theirs = send(
        &h.api,
        reqwest::Method::POST,
        &reset,
        &other,
        Some("r1"),
        body,
    )
    .await;
    assert_eq!((theirs.status, theirs.replayed), (204, false));
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_resets").await, 2);

    // A non-admin is refused before the key is looked at.
    let (_, user_token, _) = h.api.register("nobody@example.com", PW).await;
    let refused = send(
        &h.api,
        reqwest::Method::POST,
        &reset,
        &user_token,
        Some("r1"),
        body,
    )
    .await;
    assert_eq!(refused.status, 403);
}

#[tokio::test]
async fn keys_expire_after_24_hours_and_are_pruned() {
    let h = start().await;
    let path = format!("/v1/admin/users/{}/grants", h.user);
    let body = r#"{"app":"idoctor","type":"api_calls_full_process","amount":1,"reason":"old"}"#;
    let post = || {
        send(
            &h.api,
            reqwest::Method::POST,
            &path,
            &h.admin,
            Some("old-key"),
            body,
        )
    };
    let first = post().await;
    assert_eq!(first.status, 201);
    let age = |hours: i64| {
        let db = &h.db;
        async move {
            db.client()
                .await
                .execute(
                    "UPDATE idempotency_keys SET created_at = now() - $1::bigint * interval '1 hour'",
                    &[&hours],
                )
                .await
                .expect("age the key");
        }
    };
    age(23).await;
    assert!(post().await.replayed, "still replayed at 23 hours");
    age(25).await;
    let later = post().await;
    assert_eq!(
        (later.status, later.replayed),
        (201, false),
        "a new request after 24 hours"
    );
    assert_ne!(later.body["id"], first.body["id"]);
    assert_eq!(count(&h.db, "SELECT count(*) FROM quota_grants").await, 2);

    // The pruning job deletes what expired and keeps what did not.
    let other = send(
        &h.api,
        reqwest::Method::POST,
        &path,
        &h.admin,
        Some("fresh"),
        body,
    )
    .await;
    assert_eq!(other.status, 201);
    h.db.client()
        .await
        .execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old-key'",
            &[],
        )
        .await
        .expect("age");
    let client = h.db.client().await;
    let pruned = tollgate_control_plane::db::idempotency::prune(&client)
        .await
        .expect("prune");
    assert_eq!(pruned, 1);
    assert_eq!(
        count(
            &h.db,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'fresh'"
        )
        .await,
        1
    );
}
