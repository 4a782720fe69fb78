//! Plans, quotas and the ledger through the whole system: the real control plane, real sidecars
//! in front of the demo app, real PostgreSQL and Redis.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Api, Cred, IDOCTOR_ROUTES, TestDb, config, demo_app, make_admin, serve, sidecar};

const PW: &str = "correct horse battery";

/// Every 200 the sidecars answered in a test, to compare with the ledger.
static ADMITTED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

async fn post_process(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    patient: &str,
) -> (u16, reqwest::header::HeaderMap) {
    let response = http
        .post(format!("{base}/process/{patient}/2026-11-25"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    if response.status() == 200 {
        ADMITTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    (response.status().as_u16(), response.headers().clone())
}

async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn quota_of(api: &Api, token: &str, quota_type: &str) -> Value {
    let reply = api.get("/v1/quota?app=idoctor", Cred::Bearer(token)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body["quotas"]
        .as_array()
        .expect("quotas")
        .iter()
        .find(|q| q["type"] == quota_type)
        .cloned()
        .expect("quota type listed")
}

#[tokio::test]
async fn free_plan_grants_upgrade_lapse_and_reset_reach_the_sidecar() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let cp = serve(config.clone()).await;
    let api = Api::new(&cp.base);
    let app = demo_app().await;
    let sc = sidecar(&config, &cp.base, &cp.internal, &app, IDOCTOR_ROUTES).await;
    let http = reqwest::Client::new();
    let (user_id, token, _) = api.register("free@example.com", PW).await;
    api.register("boss@example.com", PW).await;
    let admin = make_admin(&db, &api, "boss@example.com", PW).await;

    // The plans are public.
    let plans = api.get("/v1/plans", Cred::None).await;
    assert_eq!(plans.status, 200);
    let free = &plans.body["items"][0];
    assert_eq!(free["id"], "free");
    assert_eq!(free["price"], json!({"amount": 0, "currency": "CNY"}));
    assert!(free["quotas"].as_array().expect("quotas").iter().any(|q| q
        == &json!({"app": "idoctor", "type": "api_calls_full_process", "limit": 50, "window": "month"})));

    // The free user's 50th call is admitted with nothing left; the 51st is refused.
    for i in 1..=50 {
        let (status, headers) = post_process(&http, &sc.base, &token, "p1").await;
        assert_eq!(status, 200, "call {i}");
        if i == 50 {
            assert_eq!(headers["x-quota-remaining"], "0");
            assert_eq!(headers["x-quota-limit"], "50");
        }
    }
    assert_eq!(post_process(&http, &sc.base, &token, "p1").await.0, 402);
    let q = quota_of(&api, &token, "api_calls_full_process").await;
    assert_eq!(
        (
            q["limit"].as_i64(),
            q["used"].as_i64(),
            q["remaining"].as_i64()
        ),
        (Some(50), Some(50), Some(0))
    );
    assert_eq!(q["window"], "month");
    assert!(
        q["resets_at"]
            .as_str()
            .expect("resets_at")
            .ends_with("T16:00:00Z"),
        "Asia/Shanghai midnight"
    );
    let storage = quota_of(&api, &token, "storage_bytes").await;
    assert!(
        storage["resets_at"].is_null(),
        "lifetime quotas never reset"
    );

    // An admin grant of 10 admits ten more at once.
    let grant = api
        .post(
            &format!("/v1/admin/users/{user_id}/grants"),
            Cred::Bearer(&admin),
            json!({"app": "idoctor", "type": "api_calls_full_process", "amount": 10, "reason": "goodwill"}),
        )
        .await;
    assert_eq!(grant.status, 201, "{:?}", grant.body);
    for i in 1..=10 {
        assert_eq!(
            post_process(&http, &sc.base, &token, "p1").await.0,
            200,
            "granted call {i}"
        );
    }
    assert_eq!(post_process(&http, &sc.base, &token, "p1").await.0, 402);
    // Only admins grant, and bad grants change nothing.
    let denied = api
        .post(
            &format!("/v1/admin/users/{user_id}/grants"),
            Cred::Bearer(&token),
            json!({"app": "idoctor", "type": "api_calls_full_process", "amount": 10, "reason": "me"}),
        )
        .await;
    assert_eq!(denied.status, 403);
    for (body, status) in [
        (
            json!({"app": "idoctor", "type": "api_calls_full_process", "amount": -5, "reason": "x"}),
            400,
        ),
        (
            json!({"app": "idoctor", "type": "api_calls_full_process", "amount": 5, "reason": ""}),
            400,
        ),
        (
            json!({"app": "idoctor", "type": "nope", "amount": 5, "reason": "x"}),
            404,
        ),
        (
            json!({"app": "nope", "type": "api_calls_full_process", "amount": 5, "reason": "x"}),
            404,
        ),
        (
            json!({"app": "idoctor", "type": "api_calls_full_process", "amount": "5", "reason": "x"}),
            400,
        ),
    ] {
        let reply = api
            .post(
                &format!("/v1/admin/users/{user_id}/grants"),
                Cred::Bearer(&admin),
                body.clone(),
            )
            .await;
        assert_eq!(reply.status, status, "{body}: {:?}", reply.body);
    }
    assert_eq!(
        quota_of(&api, &token, "api_calls_full_process").await["limit"],
        60
    );

    // An upgrade to pro (written directly until payments exist) reaches the sidecar within 1 s
    // and keeps what was used.
    {
        let mut client = db.client().await;
        let tx = client.transaction().await.expect("tx");
        let uid: uuid::Uuid = user_id.parse().expect("uuid");
        tollgate_control_plane::db::subscriptions::activate(&tx, uid, "pro", None)
            .await
            .expect("activate");
        tollgate_control_plane::db::outbox::enqueue(
            &tx,
            tollgate_control_plane::db::outbox::Topic::User,
            &user_id,
        )
        .await
        .expect("outbox");
        tx.commit().await.expect("commit");
    }
    let upgraded = Instant::now();
    eventually(
        Duration::from_secs(1),
        "pro limits at the sidecar",
        || async { post_process(&http, &sc.base, &token, "p1").await.0 == 200 },
    )
    .await;
    assert!(upgraded.elapsed() < Duration::from_secs(1));
    let q = quota_of(&api, &token, "api_calls_full_process").await;
    assert_eq!(q["limit"], 2010, "pro's 2000 plus this window's grant");
    assert_eq!(q["used"], 61, "used survives the upgrade");
    let me_quota = api.get("/v1/quota?app=idoctor", Cred::Bearer(&token)).await;
    assert_eq!(me_quota.body["plan"]["id"], "pro");
    assert!(me_quota.body["plan"]["expires_at"].is_string());

    // The paid period ends: the scheduled job puts the user back on free, and the sidecar refuses.
    db.client()
        .await
        .execute(
            "UPDATE subscriptions SET period_start = now() - interval '2 months', period_end = now() - interval '1 second'
             WHERE user_id = $1::text::uuid AND status = 'active'",
            &[&user_id],
        )
        .await
        .expect("expire");
    eventually(Duration::from_secs(10), "lapse back to free", || async {
        post_process(&http, &sc.base, &token, "p1").await.0 == 402
    })
    .await;
    let me_quota = api.get("/v1/quota?app=idoctor", Cred::Bearer(&token)).await;
    assert_eq!(me_quota.body["plan"]["id"], "free");

    // An admin reset sets the window's used to 0.
    let reset = api
        .post(
            &format!("/v1/admin/users/{user_id}/reset"),
            Cred::Bearer(&admin),
            json!({"app": "idoctor", "type": "api_calls_full_process"}),
        )
        .await;
    assert_eq!(reset.status, 204, "{:?}", reset.body);
    let (status, headers) = post_process(&http, &sc.base, &token, "p1").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-quota-remaining"], "59", "free 50 + grant 10 - 1");
    // A failed call is refunded and never reaches the ledger.
    assert_eq!(post_process(&http, &sc.base, &token, "fail").await.0, 500);
    let admin_view = api
        .get(
            &format!("/v1/admin/users/{user_id}/quota?app=idoctor"),
            Cred::Bearer(&admin),
        )
        .await;
    assert_eq!(admin_view.status, 200);
    assert_eq!(admin_view.body["app"], "idoctor");

    // Every counted request reaches the ledger once its minute has closed, exactly once, as
    // aggregates per period and route; every granularity sums to the same.
    let expected = ADMITTED.load(std::sync::atomic::Ordering::SeqCst);
    assert!(expected >= 62);
    support::drain_now(&config).await;
    let query = "&app=idoctor&type=api_calls_full_process";
    let totals = support::usage_totals(&api, Cred::Bearer(&token), query).await;
    for (granularity, amount, calls) in &totals {
        assert_eq!(
            (*amount, *calls),
            (expected, expected),
            "{granularity}: {totals:?}"
        );
    }
    let page = api
        .get("/v1/usage?granularity=minute", Cred::Bearer(&token))
        .await;
    let mut last: Option<String> = None;
    for item in page.body["items"].as_array().expect("items") {
        assert_eq!(item["app"], "idoctor");
        assert_eq!(item["route"], "POST /process/{patient}/{date}");
        let at = item["period_start"].as_str().expect("time").to_owned();
        assert!(at.ends_with(":00Z"), "{at}");
        if let Some(prev) = &last {
            assert!(at <= *prev, "newest first");
        }
        last = Some(at);
    }
    // Draining again adds nothing.
    support::drain_now(&config).await;
    assert_eq!(
        support::usage_totals(&api, Cred::Bearer(&token), query).await,
        totals
    );
    let admin_usage = api
        .get(
            &format!("/v1/admin/users/{user_id}/usage?granularity=month"),
            Cred::Bearer(&admin),
        )
        .await;
    assert_eq!(admin_usage.status, 200, "{:?}", admin_usage.body);
    assert_eq!(admin_usage.body["items"][0]["calls"], expected);
    for bad in [
        "/v1/usage?limit=0",
        "/v1/usage?cursor=%%%",
        "/v1/usage?from=yesterday",
        "/v1/usage?granularity=week",
        "/v1/quota",
    ] {
        assert_eq!(
            api.get(bad, Cred::Bearer(&token)).await.status,
            400,
            "{bad}"
        );
    }
    assert_eq!(
        api.get("/v1/quota?app=nope", Cred::Bearer(&token))
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn a_new_app_is_metered_without_code_change() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let cp = serve(config.clone()).await;
    let api = Api::new(&cp.base);
    let (_, token, _) = api.register("writer@example.com", PW).await;
    api.register("ops@example.com", PW).await;
    let admin = make_admin(&db, &api, "ops@example.com", PW).await;

    let created = api
        .post(
            "/v1/admin/apps",
            Cred::Bearer(&admin),
            json!({"id": "textgen", "name": "AI text", "time_zone": "UTC"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let dup = api
        .post(
            "/v1/admin/apps",
            Cred::Bearer(&admin),
            json!({"id": "textgen", "name": "again"}),
        )
        .await;
    assert_eq!(dup.status, 409);
    for (key, unit, window) in [
        ("ai_text_generation", "calls", "day"),
        ("ai_text_tokens", "tokens", "month"),
    ] {
        let reply = api
            .post(
                "/v1/admin/apps/textgen/quota-types",
                Cred::Bearer(&admin),
                json!({"key": key, "name": key, "unit": unit, "window": window}),
            )
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
    }
    let bad = api
        .post(
            "/v1/admin/apps/textgen/quota-types",
            Cred::Bearer(&admin),
            json!({"key": "weekly", "name": "w", "unit": "calls", "window": "week"}),
        )
        .await;
    assert_eq!(bad.status, 400);
    // Give every free user some of it by editing the plan: applies to every subscriber.
    let plans = api.get("/v1/plans", Cred::None).await;
    let free = plans.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|p| p["id"] == "free")
        .cloned()
        .expect("free");
    let mut quotas: Vec<Value> = free["quotas"]
        .as_array()
        .expect("quotas")
        .iter()
        .map(|q| json!({"app": q["app"], "type": q["type"], "limit": q["limit"]}))
        .collect();
    quotas.push(json!({"app": "textgen", "type": "ai_text_generation", "limit": 3}));
    quotas.push(json!({"app": "textgen", "type": "ai_text_tokens", "limit": 1000}));
    let put = api
        .call(
            reqwest::Method::PUT,
            "/v1/admin/plans/free",
            Cred::Bearer(&admin),
            Some(json!({"name": "Free", "price": {"amount": 0, "currency": "CNY"}, "period": "month", "quotas": quotas})),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);

    let (upstream, _) = {
        let router = axum::Router::new().fallback(|| async { "generated text" });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        (format!("http://{addr}"), ())
    };
    let routes = "app: textgen\ntime_zone: UTC\nroutes:\n  - {method: POST, path: /v1/generate, quota: ai_text_generation, cost: 1}\n";
    let sc = sidecar(&config, &cp.base, &cp.internal, &upstream, routes).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = http
            .post(format!("{}/v1/generate", sc.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 402]);
    let quota = api.get("/v1/quota?app=textgen", Cred::Bearer(&token)).await;
    assert_eq!(quota.status, 200);
    let generation = quota.body["quotas"]
        .as_array()
        .expect("q")
        .iter()
        .find(|q| q["type"] == "ai_text_generation")
        .cloned()
        .expect("type");
    assert_eq!(
        (generation["limit"].as_i64(), generation["used"].as_i64()),
        (Some(3), Some(3))
    );
    assert_eq!(generation["window"], "day");
}
