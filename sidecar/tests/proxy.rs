//! The sidecar table of docs/api.md, end to end: a real sidecar, a real upstream, real Redis (and
//! Redis Cluster when `scripts/test` provides one).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{ControlPlane, ROUTES, demo_upstream, echo_upstream, send, start_sidecar};
use tollgate_common::window::Window::{Lifetime, Month};
use tollgate_sidecar::config;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, calls) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_l3_detect", 100, Month)]).await;
    let url = format!("{}/results/p1", sc.base);

    // Public route: no credentials needed.
    let health = send(http().get(format!("{}/health", sc.base))).await;
    assert_eq!(health.status, 200);
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);

    let now = chrono::Utc::now().timestamp();
    let good = cp.token(user);
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no credentials", None),
        ("malformed", Some("Bearer not.a.jwt".to_owned())),
        (
            "badly signed",
            Some(format!("Bearer {}.{}.{}", parts[0], parts[1], "AAAA")),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                cp.token_with(
                    user,
                    json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})
                )
            )),
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                cp.token_with(user, json!({"aud": "elsewhere"}))
            )),
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                cp.token_with(user, json!({"iss": "elsewhere"}))
            )),
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                cp.token_with(user, json!({"nbf": now + 3600}))
            )),
        ),
        (
            "issued a year in the future",
            Some(format!(
                "Bearer {}",
                cp.token_with(user, json!({"iat": now + 365 * 86_400}))
            )),
        ),
        ("oversized", Some(format!("Bearer {}", "x".repeat(9000)))),
    ];
    for (name, auth) in cases {
        let mut request = http().get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let reply = send(request).await;
        assert_eq!(reply.status, 401, "{name}");
        assert_eq!(reply.body["error"]["code"], "unauthorized", "{name}");
        assert_eq!(reply.headers["www-authenticate"], "Bearer", "{name}");
        assert!(reply.headers.contains_key("x-request-id"), "{name}");
    }
    // API keys: unknown, malformed, expired.
    let expired = cp.api_key(user, now - 10).await;
    for key in [
        "tgk_nonsense".to_owned(),
        tollgate_common::api_key::generate(),
        expired,
    ] {
        let reply = send(http().get(&url).header("x-api-key", key)).await;
        assert_eq!(reply.status, 401);
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "the app is never called for a refused request"
    );

    // The genuine token and a live key work.
    let ok = send(http().get(&url).bearer_auth(&good)).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["headers"]["x-user-id"], user.to_string());
    assert_eq!(ok.body["headers"]["x-auth-method"], "jwt");
    let key = cp.api_key(user, 0).await;
    let ok = send(http().get(&url).header("x-api-key", &key)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["headers"]["x-auth-method"], "api_key");
}

#[tokio::test]
async fn identity_headers_are_the_sidecars_own() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[]).await;
    let key = cp.api_key(user, 0).await;
    let reply = send(
        http()
            .get(format!("{}/anything?x=1", sc.base))
            .header("x-api-key", &key)
            .header("x-user-id", "someone-else")
            .header("x-auth-method", "jwt")
            .header("x-plan", "enterprise")
            .header("x-request-id", "client-chosen-id")
            .header("connection", "keep-alive, x-secret-hop")
            .header("x-secret-hop", "drop me"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let h = &reply.body["headers"];
    assert_eq!(h["x-user-id"], user.to_string());
    assert_eq!(h["x-auth-method"], "api_key");
    assert_eq!(h["x-plan"], "free");
    assert_eq!(h["x-request-id"], "client-chosen-id");
    assert_eq!(reply.headers["x-request-id"], "client-chosen-id");
    assert!(
        h.get("x-api-key").is_none(),
        "the key never reaches the app"
    );
    assert!(
        h.get("x-secret-hop").is_none(),
        "hop-by-hop headers are dropped"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(reply.body["path"], "/anything");

    // On a public route, a client cannot smuggle an identity either.
    let public = send(
        http()
            .get(format!("{}/health", sc.base))
            .header("x-user-id", "forged"),
    )
    .await;
    assert_eq!(public.status, 200);
    assert!(public.body["headers"].get("x-user-id").is_none());
}

#[tokio::test]
async fn disabled_users_and_revoked_tokens() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[]).await;
    let token = cp.token(user);
    let url = format!("{}/results/p", sc.base);
    assert_eq!(send(http().get(&url).bearer_auth(&token)).await.status, 200);
    cp.write_user(user, "disabled", &[]).await;
    let reply = send(http().get(&url).bearer_auth(&token)).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body["error"]["code"], "account_disabled");

    // A token issued before the user's cut-off is refused even after re-enabling.
    cp.write_user(user, "active", &[]).await;
    use fred::interfaces::HashesInterface;
    let cutoff = chrono::Utc::now().timestamp();
    let _: () = cp
        .redis
        .hset(cp.keys.user(user), ("tva", cutoff.to_string()))
        .await
        .expect("hset");
    let reply = send(http().get(&url).bearer_auth(&token)).await;
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn revoked_api_key_is_refused_within_a_second() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[]).await;
    let key = cp.api_key(user, 0).await;
    let url = format!("{}/results/p", sc.base);
    // Warm the cache.
    for _ in 0..3 {
        assert_eq!(
            send(http().get(&url).header("x-api-key", &key))
                .await
                .status,
            200
        );
    }
    cp.revoke(&key).await;
    let revoked_at = Instant::now();
    loop {
        let status = send(http().get(&url).header("x-api-key", &key))
            .await
            .status;
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "a revoked key still worked after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn quota_and_refunds(redis_url: &str) {
    let cp = ControlPlane::start(redis_url).await;
    assert_eq!(
        fred::interfaces::ClientLike::is_clustered(&cp.redis),
        redis_url.starts_with("redis-cluster://")
    );
    let upstream = demo_upstream().await;
    let sc = start_sidecar(&cp, redis_url, &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_full_process", 3, Month)]).await;
    let token = cp.token(user);
    let process = |patient: &str| {
        http()
            .post(format!("{}/process/{patient}/2026-11-25", sc.base))
            .bearer_auth(&token)
    };
    for remaining in [2, 1] {
        let reply = send(process("p1")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.headers["x-quota-type"], "api_calls_full_process");
        assert_eq!(reply.headers["x-quota-limit"], "3");
        assert_eq!(
            reply.headers["x-quota-remaining"],
            remaining.to_string().as_str()
        );
        let reset = reply.headers["x-quota-reset"].to_str().expect("ascii");
        let reset: chrono::DateTime<chrono::Utc> = reset.parse().expect("rfc3339");
        // Calendar month in Asia/Shanghai: midnight there is 16:00 UTC.
        assert_eq!(reset.format("%H:%M:%S").to_string(), "16:00:00");
        assert!(reply.headers.contains_key("ratelimit-policy"));
        assert!(reply.headers.contains_key("ratelimit"));
    }
    // The app fails: the cost is given back.
    let failed = send(process("fail")).await;
    assert_eq!(failed.status, 500);
    assert_eq!(cp.used(user, "api_calls_full_process").await, 2);
    // The last one.
    let last = send(process("p2")).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.headers["x-quota-remaining"], "0");
    // Over quota: 402 with details, the app is not called.
    let over = send(process("p3")).await;
    assert_eq!(over.status, 402);
    assert_eq!(over.body["error"]["code"], "quota_exceeded");
    let d = &over.body["error"]["details"];
    assert_eq!(d["app"], "idoctor");
    assert_eq!(d["type"], "api_calls_full_process");
    assert_eq!(d["limit"], 3);
    assert_eq!(d["used"], 3);
    assert_eq!(d["remaining"], 0);
    assert!(d["resets_at"].is_string());
    let results = send(
        http()
            .get(format!("{}/results/p3", sc.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        results.body["items"].as_array().map(Vec::len),
        Some(0),
        "the app never ran p3"
    );
    // Exactly the three successful calls are in the usage bucket; the failed one is not.
    assert_eq!(
        cp.usage(user).await.get("api_calls_full_process"),
        Some(&(3, 3))
    );
    // A quota the plan does not include is a 402 with limit 0.
    let l3 = send(
        http()
            .post(format!("{}/l3/p1", sc.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(l3.status, 402);
    assert_eq!(l3.body["error"]["details"]["limit"], 0);
}

#[tokio::test]
async fn quota_is_taken_and_refunded_on_app_failure() {
    quota_and_refunds(&support::redis_url()).await;
}

#[tokio::test]
async fn quota_is_taken_and_refunded_on_app_failure_in_cluster() {
    if let Some(url) = support::cluster_url("quota_is_taken_and_refunded_on_app_failure_in_cluster")
    {
        quota_and_refunds(&url).await;
    }
}

#[tokio::test]
async fn unreachable_app_is_502_and_counts_nothing() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    // Nothing listens on port 1.
    let sc = start_sidecar(
        &cp,
        &support::redis_url(),
        "http://127.0.0.1:1",
        ROUTES,
        &[],
    )
    .await;
    let user = cp.user(&[("api_calls_full_process", 5, Month)]).await;
    let reply = send(
        http()
            .post(format!("{}/process/p/2026-01-01", sc.base))
            .bearer_auth(cp.token(user)),
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.body["error"]["code"], "bad_gateway");
    assert_eq!(cp.used(user, "api_calls_full_process").await, 0);
    assert!(cp.usage(user).await.is_empty());
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[]).await;
    let token = cp.token(user);
    let url = format!("{}/tight", sc.base);
    for remaining in [1, 0] {
        let reply = send(http().get(&url).bearer_auth(&token)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["ratelimit-policy"], "\"tight\";q=2;w=60");
        let state = reply.headers["ratelimit"].to_str().expect("ascii");
        assert!(
            state.starts_with(&format!("\"tight\";r={remaining};t=")),
            "{state}"
        );
    }
    let limited = send(http().get(&url).bearer_auth(&token)).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["code"], "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    // Another user has their own budget.
    let other = cp.user(&[]).await;
    assert_eq!(
        send(http().get(&url).bearer_auth(cp.token(other)))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn uploads_are_metered_by_size_before_and_while_streaming() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let upstream = demo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("storage_bytes", 10_000, Lifetime)]).await;
    let token = cp.token(user);
    let upload = || {
        http()
            .post(format!("{}/upload", sc.base))
            .bearer_auth(&token)
    };

    let ok = send(upload().body(vec![1u8; 4_000])).await;
    assert_eq!(ok.status, 201, "{:?}", ok.body);
    assert_eq!(ok.body["size"], 4000);
    assert_eq!(ok.headers["x-quota-remaining"], "6000");
    assert!(
        !ok.headers.contains_key("x-quota-reset"),
        "lifetime quotas never reset"
    );

    // A Content-Length above what remains is refused before any of the body is read.
    let too_big = send(upload().body(vec![1u8; 7_000])).await;
    assert_eq!(too_big.status, 402);
    assert_eq!(too_big.body["error"]["details"]["remaining"], 6000);
    assert_eq!(cp.used(user, "storage_bytes").await, 4000);

    // A chunked body is counted as it streams: within what remains it is charged its real size.
    let chunks = |n: usize, size: usize| {
        let stream = futures_util::stream::iter(
            (0..n).map(move |_| Ok::<_, std::io::Error>(vec![2u8; size])),
        );
        reqwest::Body::wrap_stream(stream)
    };
    let streamed = send(upload().body(chunks(5, 500))).await;
    assert_eq!(streamed.status, 201, "{:?}", streamed.body);
    assert_eq!(streamed.body["size"], 2500);
    assert_eq!(cp.used(user, "storage_bytes").await, 6500);
    assert_eq!(streamed.headers["x-quota-remaining"], "3500");
    // Past what remains, it is cut off with 402 and nothing is charged.
    let cut = send(upload().body(chunks(10, 1000))).await;
    assert_eq!(cut.status, 402, "{:?}", cut.body);
    assert_eq!(cut.body["error"]["code"], "quota_exceeded");
    assert_eq!(cp.used(user, "storage_bytes").await, 6500);
    // Two uploads counted, at their real sizes; the one cut off is not.
    assert_eq!(cp.usage(user).await.get("storage_bytes"), Some(&(6500, 2)));
}

#[tokio::test]
async fn redis_down_fails_closed_by_default_and_open_when_configured() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, calls) = echo_upstream().await;
    // The sidecars' Redis is a closed port; the test's own control plane still works.
    let closed = start_sidecar(&cp, "redis://127.0.0.1:1", &upstream, ROUTES, &[]).await;
    let open = start_sidecar(
        &cp,
        "redis://127.0.0.1:1",
        &upstream,
        ROUTES,
        &[(config::ENV_FAIL_MODE, "open")],
    )
    .await;
    let user = cp.user(&[("api_calls_l3_detect", 5, Month)]).await;
    let token = cp.token(user);
    let reply = send(
        http()
            .post(format!("{}/l3/p", closed.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body["error"]["code"], "quota_backend_unavailable");
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let reply = send(
        http()
            .post(format!("{}/status/200", open.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(reply.status, 200, "fail-open forwards: {:?}", reply.body);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before + 1);
    let ready = send(http().get(format!("{}/readyz", closed.admin))).await;
    assert_eq!(ready.status, 503);
    let metrics = metrics_text(&open).await;
    assert!(
        metrics.contains("tollgate_sidecar_fail_open_total"),
        "{metrics}"
    );
    assert!(metrics.contains("decision=\"fail_open\""), "{metrics}");
    // A refusal's decision label is its error code.
    let metrics = metrics_text(&closed).await;
    assert!(
        metrics.contains("decision=\"quota_backend_unavailable\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_missing_user_hash_is_refilled_once_by_the_control_plane() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user_on_request(&[("api_calls_l3_detect", 100, Month)]);
    let token = cp.token(user);
    let requests = (0..10).map(|_| {
        send(
            http()
                .post(format!("{}/status/200", sc.base))
                .bearer_auth(&token),
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "all admitted once the hash is written"
    );
    assert!(
        cp.refills.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "concurrent requests share the refill call"
    );
    // A valid token of a user the control plane does not know (deleted): 401, remembered, so
    // that its next calls cost neither a refill nor Redis.
    let stranger = uuid::Uuid::new_v4();
    let refills = cp.refills.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        let reply = send(
            http()
                .post(format!("{}/status/200", sc.base))
                .bearer_auth(cp.token(stranger)),
        )
        .await;
        assert_eq!(reply.status, 401, "{:?}", reply.body);
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(
        cp.refills.load(std::sync::atomic::Ordering::SeqCst),
        refills + 1,
        "one refill call for the stranger, then the cached refusal"
    );
}

async fn exactly_min_n_r_across_two_sidecars(redis_url: &str) {
    let cp = ControlPlane::start(redis_url).await;
    assert_eq!(
        fred::interfaces::ClientLike::is_clustered(&cp.redis),
        redis_url.starts_with("redis-cluster://")
    );
    let (upstream, _) = echo_upstream().await;
    let a = start_sidecar(&cp, redis_url, &upstream, ROUTES, &[]).await;
    let b = start_sidecar(&cp, redis_url, &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_l3_detect", 50, Month)]).await;
    let token = cp.token(user);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let requests = (0..200).map(|i| {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        send(
            client
                .post(format!("{base}/status/200"))
                .bearer_auth(&token),
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    let admitted = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies.iter().filter(|r| r.status == 402).count();
    assert_eq!(admitted, 50, "exactly the remaining 50 are admitted");
    assert_eq!(refused, 150);
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 50);
    assert_eq!(cp.calls(user).await, 50);
}

#[tokio::test]
async fn concurrent_requests_over_two_sidecars_admit_exactly_the_remaining() {
    exactly_min_n_r_across_two_sidecars(&support::redis_url()).await;
}

#[tokio::test]
async fn concurrent_requests_over_two_sidecars_admit_exactly_the_remaining_in_cluster() {
    if let Some(url) = support::cluster_url(
        "concurrent_requests_over_two_sidecars_admit_exactly_the_remaining_in_cluster",
    ) {
        exactly_min_n_r_across_two_sidecars(&url).await;
    }
}

#[tokio::test]
async fn admin_listener_serves_ops_and_the_proxy_does_not() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    assert_eq!(
        send(http().get(format!("{}/healthz", sc.admin)))
            .await
            .status,
        200
    );
    assert_eq!(
        send(http().get(format!("{}/readyz", sc.admin)))
            .await
            .status,
        200
    );
    let user = cp.user(&[]).await;
    send(
        http()
            .get(format!("{}/x", sc.base))
            .bearer_auth(cp.token(user)),
    )
    .await;
    let metrics = metrics_text(&sc).await;
    for name in [
        "tollgate_sidecar_requests_total",
        "tollgate_sidecar_decision_duration_seconds",
        "tollgate_sidecar_upstream_duration_seconds",
        "tollgate_sidecar_in_flight_requests",
        "tollgate_sidecar_cache_requests_total",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(metrics.contains("decision=\"allowed\""));
    // The proxy listener forwards /metrics to the app like any other path: it needs credentials.
    assert_eq!(
        send(http().get(format!("{}/metrics", sc.base)))
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn no_spelling_of_a_metered_path_goes_through_uncounted() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, calls) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_l3_detect", 100, Month)]).await;
    let token = cp.token(user);
    // (Dot segments are covered by the unit tests: HTTP clients remove them before sending.)
    for path in ["//l3/p1", "/%6C3/p1", "/l3%2Fp1", "/l3//p1"] {
        let reply = send(
            http()
                .post(format!("{}{path}", sc.base))
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(reply.status, 400, "{path}");
        assert_eq!(reply.body["error"]["code"], "invalid_request", "{path}");
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "none reached the app"
    );
    // A trailing slash is the same route, and is counted.
    let reply = send(
        http()
            .post(format!("{}/status/200/", sc.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 1);
}

#[tokio::test]
async fn refunds_do_not_depend_on_the_clients_request_id() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_l3_detect", 100, Month)]).await;
    let token = cp.token(user);
    for _ in 0..3 {
        let reply = send(
            http()
                .post(format!("{}/status/503", sc.base))
                .bearer_auth(&token)
                .header("x-request-id", "same-id-every-time"),
        )
        .await;
        assert_eq!(reply.status, 503);
    }
    assert_eq!(
        cp.used(user, "api_calls_l3_detect").await,
        0,
        "every failure refunded"
    );
}

/// The sidecar's `/metrics` page.
async fn metrics_text(sc: &support::Sidecar) -> String {
    http()
        .get(format!("{}/metrics", sc.admin))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The value of one series in the sidecar's metrics, 0 if absent.
async fn metric(sc: &support::Sidecar, series: &str) -> f64 {
    metrics_text(sc)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_hammering_after_its_quota_is_gone_is_refused_without_redis() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let (upstream, _) = echo_upstream().await;
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &[]).await;
    let user = cp.user(&[("api_calls_l3_detect", 2, Month)]).await;
    let token = cp.token(user);
    let call = || send(http().post(format!("{}/l3/p", sc.base)).bearer_auth(&token));
    assert_eq!(call().await.status, 200);
    assert_eq!(call().await.status, 200);
    let first = call().await;
    assert_eq!(first.status, 402);
    let cached = r#"tollgate_sidecar_cached_refusals_total{kind="quota_exceeded"}"#;
    let before = metric(&sc, cached).await;
    for _ in 0..20 {
        let again = call().await;
        assert_eq!(again.status, 402);
        // The same answer Redis gave.
        assert_eq!(again.body["error"], first.body["error"]);
    }
    assert_eq!(
        metric(&sc, cached).await - before,
        20.0,
        "all from the cache"
    );
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 2);

    // A grant (the control plane rewrites the user and announces it) ends the refusal at once.
    cp.write_user(user, "active", &[("api_calls_l3_detect", 3, Month)])
        .await;
    let started = Instant::now();
    loop {
        let reply = call().await;
        if reply.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn uploads_of_unknown_length_share_what_remains_and_a_broken_one_is_refunded() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let upstream = demo_upstream().await;
    let step = [(config::ENV_UPLOAD_RESERVE_STEP, "1000")];
    let sc = start_sidecar(&cp, &support::redis_url(), &upstream, ROUTES, &step).await;
    let user = cp.user(&[("storage_bytes", 10_000, Lifetime)]).await;
    let token = cp.token(user);
    let url = format!("{}/upload", sc.base);

    // A slow upload of unknown length is under way (3 × 500 bytes so far)...
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let slow = {
        let request = http()
            .post(&url)
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(tokio_stream_of(rx)));
        tokio::spawn(async move { send(request).await })
    };
    for _ in 0..3 {
        tx.send(Ok(vec![1u8; 500])).await.expect("chunk");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reserved = cp.used(user, "storage_bytes").await;
    assert!(
        (1000..=2000).contains(&reserved),
        "it holds a step or two, not everything: {reserved}"
    );
    // ...and another upload of the same user still finds what remains.
    let other = send(http().post(&url).bearer_auth(&token).body(vec![2u8; 7_000])).await;
    assert_eq!(other.status, 201, "{:?}", other.body);
    for _ in 0..3 {
        tx.send(Ok(vec![1u8; 500])).await.expect("chunk");
    }
    drop(tx);
    let slow = slow.await.expect("task");
    assert_eq!(slow.status, 201, "{:?}", slow.body);
    assert_eq!(slow.body["size"], 3000);
    assert_eq!(cp.used(user, "storage_bytes").await, 10_000);
    let usage = cp.usage(user).await;
    assert_eq!(usage.get("storage_bytes"), Some(&(10_000, 2)));

    // A client that breaks off mid-upload is refunded, whatever the app made of it.
    let user = cp.user(&[("storage_bytes", 10_000, Lifetime)]).await;
    let token = cp.token(user);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let broken = {
        let request = http()
            .post(&url)
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(tokio_stream_of(rx)));
        tokio::spawn(async move { request.send().await.map(|r| r.status()) })
    };
    tx.send(Ok(vec![1u8; 1500])).await.expect("chunk");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(cp.used(user, "storage_bytes").await > 0);
    tx.send(Err(std::io::Error::other("the client goes away")))
        .await
        .expect("error");
    let _ = broken.await;
    let started = Instant::now();
    while cp.used(user, "storage_bytes").await != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still charged: {}",
            cp.used(user, "storage_bytes").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cp.usage(user).await.is_empty());
}

/// The receiving end of a channel as a stream of body chunks.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
